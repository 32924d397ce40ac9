"""trimperor: a process emperor on trio.

It keeps one *vassal* process per configuration it finds in its sources
(directories, globs, databases, message buses), spawning, reloading, stopping
and respawning them as the configurations come and go.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
