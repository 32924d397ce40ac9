import sys


def main() -> int:
    """``trimperor ctl ...`` starts without loading the emperor (it runs once, briefly)."""
    if sys.argv[1:2] == ["ctl"]:
        from trimperor.ctl import main as ctl_main

        return ctl_main(sys.argv[2:])
    from trimperor.cli import main as emperor_main

    return emperor_main()


if __name__ == "__main__":
    sys.exit(main())
