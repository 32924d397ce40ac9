"""Starting vassal processes on Linux, and stopping every process they leave.

Each vassal is the leader of a new session (so of a new process group); stops
signal the whole group, and once the leader has exited whatever is left of its
group is killed before the leader is reaped (while the zombie leader still
reserves the group id). Vassals get ``PR_SET_PDEATHSIG=SIGKILL`` so that they
die with the emperor even when the emperor is killed with SIGKILL.

Why not ``trio.lowlevel.open_process``: it forks in a worker thread, and the
parent-death signal fires when the *thread* that forked exits, which trio's
thread cache does after a few idle seconds. We fork from the main thread and
wait on a pidfd, which is what trio does internally on Linux.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess

import trio

from trimperor.abc import LaunchPlan
from trimperor.core.errors import SpawnError
from trimperor.vassals.asuser import LIBC, Credentials, run_as

__all__ = [
    "PosixProcess",
    "PosixSpawner",
    "become_subreaper",
    "raise_fd_limit",
    "resolve_ids",
    "vassal_nofile",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = LIBC


def _child_setup(emperor_pid: int, cwd: str) -> None:  # pragma: no cover - runs in the child
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The emperor may have died between fork and prctl: then we were re-parented.
    if os.getppid() != emperor_pid:
        os._exit(1)
    # Python ignores SIGPIPE; a vassal expects the default. And no signal the
    # emperor's thread blocks (see sockets.Arrivals) stays blocked.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # The emperor raised its own open-file limit (it holds several fds per
    # vassal); vassals get the limit it was started with, as systemd does for
    # programs that still use select().
    if _VASSAL_NOFILE is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, _VASSAL_NOFILE)
    # Here, after the change of user (subprocess's own ``cwd=`` would enter it
    # as root): a vassal can only work in a directory its user may enter.
    os.chdir(cwd)


_VASSAL_NOFILE: tuple[int, int] | None = None


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants; True if it is now.

    Orphans then come to it instead of to init, so that it can kill and reap
    what a dead launcher left (see :mod:`trimperor.vassals.launcher`).
    """
    if _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def vassal_nofile() -> tuple[int, int] | None:
    """The open-file limit vassals get, if the emperor raised its own."""
    return _VASSAL_NOFILE


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; vassals keep the old one.

    Returns the (soft, hard) limits now in force for the emperor.
    """
    global _VASSAL_NOFILE  # noqa: PLW0603 - set once at start, read in children
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
        _VASSAL_NOFILE = (soft, hard)
        log.info("emperor.fd_limit raised=%d was=%d", hard, soft)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


_LISTEN_FDS_START = 3


def _child_exec_with_listen_fds(
    emperor_pid: int, cwd: str, argv: list[str], env: dict[str, str], fds: tuple[int, ...]
) -> None:  # pragma: no cover - runs in the child
    """preexec_fn for socket hand-off: put *fds* at 3, 4, ..., set LISTEN_PID to
    our own pid, close everything else, and exec. Never returns on success.

    The environment must name the child's pid, which only the child knows, so
    the child execs itself instead of returning to subprocess.
    """
    _child_setup(emperor_pid, cwd)
    # Move them out of the way first: a source may sit where another must go.
    high = [os.dup(fd) for fd in fds]
    top = max([*high, *fds, _LISTEN_FDS_START + len(fds)]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in high]
    for fd in high:
        os.close(fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, _LISTEN_FDS_START + i, inheritable=True)
    os.closerange(_LISTEN_FDS_START + len(fds), max(moved) + 1)
    os.closerange(max(moved) + 1, os.sysconf("SC_OPEN_MAX"))
    env["LISTEN_PID"] = str(os.getpid())
    os.execvpe(argv[0], argv, env)


def resolve_ids(
    user: str | None, group: str | None, init_groups: bool = True
) -> tuple[int | None, int | None, tuple[int, ...] | None]:
    """Names or numbers -> (uid, gid, supplementary groups). Raises SpawnError.

    The groups are the user's own (as initgroups would set them) when
    *init_groups*, else just the primary group.
    """
    uid = gid = None
    groups: tuple[int, ...] | None = None
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            if not user.isdigit():
                raise SpawnError(f"unknown user {user!r}") from None
            uid = int(user)
        else:
            uid, gid = pw.pw_uid, pw.pw_gid
            if os.geteuid() == 0 and init_groups:
                groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SpawnError(f"unknown group {group!r}") from None
        if groups is not None and gid not in groups:
            groups = (gid, *groups)
    if groups is not None and not init_groups:
        groups = (gid,) if gid is not None else ()
    if uid is not None and groups is None and os.geteuid() == 0:
        groups = (gid,) if gid is not None else ()
    return uid, gid, groups


class PosixProcess:
    """A running vassal: its Popen, a pidfd to wait on, and its output pipe."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        output: trio.lowlevel.FdStream | None,
        errors: trio.lowlevel.FdStream | None = None,
    ):
        self._popen = popen
        self._output = output
        self._errors = errors
        self._pidfd: int | None = os.pidfd_open(popen.pid)
        self._reaped = False

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @property
    def output(self) -> trio.lowlevel.FdStream | None:
        return self._output

    @property
    def errors(self) -> trio.lowlevel.FdStream | None:
        return self._errors

    def signal_group(self, sig: int) -> None:
        if self._reaped:
            return
        try:
            os.killpg(self._popen.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The group holds a process we may not signal (setuid helper); at
            # least reach the leader.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, sig)

    def send(self, sig: int) -> None:
        """Signal the leader only (reload signals go to the master process)."""
        if not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, sig)

    async def wait(self) -> int:
        if self._reaped:
            assert self._popen.returncode is not None
            return self._popen.returncode
        assert self._pidfd is not None
        await trio.lowlevel.wait_readable(self._pidfd)
        # The leader is a zombie and still holds the group id: nothing left of
        # the group can escape, and the id cannot be reused yet.
        self.signal_group(signal.SIGKILL)
        returncode = self._popen.wait()
        self._reaped = True
        self._close_pidfd()
        return returncode

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def aclose(self) -> None:
        """Kill the whole group, reap, release every fd. Safe to call twice."""
        if not self._reaped:
            self.signal_group(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await self.wait()
        for stream in (self._output, self._errors):
            if stream is not None:
                await stream.aclose()


class PosixSpawner:
    """The real spawner: fork/exec from the main thread, one session per vassal."""

    def __init__(self) -> None:
        self._emperor_pid = os.getpid()

    async def spawn(self, plan: LaunchPlan) -> PosixProcess:
        uid, gid, groups = resolve_ids(plan.user, plan.group, plan.init_groups)
        creds = None
        if plan.as_user and uid is not None:
            creds = Credentials(uid, uid if gid is None else gid, groups or ())
        # Checked here for a clear message; the child enters it again as the
        # vassal's user (see _child_setup), which is what counts.
        await run_as(creds, _check_directory, plan.cwd, uid)
        read_fd: int | None = None
        err_read: int | None = None
        write_fd: int
        err_write: int | None = None
        if plan.logto is not None:
            write_fd = await run_as(creds, _open_log, plan.logto, uid)
        else:
            read_fd, write_fd = os.pipe()
            err_read, err_write = os.pipe()
        stdin = subprocess.DEVNULL if plan.stdin_fd is None else plan.stdin_fd
        env = dict(plan.env)
        argv = list(plan.argv)
        emperor_pid = self._emperor_pid
        cwd = plan.cwd

        def preexec() -> None:  # pragma: no cover - runs in the child
            _child_setup(emperor_pid, cwd)

        if plan.listen_fds:
            # Our own exec in the child: check what would fail there, here.
            program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
            if program is None:
                for fd in (write_fd, read_fd, err_write, err_read):
                    if fd is not None:
                        os.close(fd)
                raise SpawnError(f"program {plan.argv[0]!r} not found")
            env["LISTEN_FDS"] = str(len(plan.listen_fds))
            env["LISTEN_FDNAMES"] = ":".join(plan.listen_names)
            fds = plan.listen_fds
            child_argv = [program, *argv[1:]]
            child_env = env

            def preexec() -> None:  # pragma: no cover - runs in the child
                _child_exec_with_listen_fds(emperor_pid, cwd, child_argv, child_env, fds)

        try:
            # Forking from the main thread on purpose (see the module docstring).
            # preexec_fn sets the parent-death signal; note that with it CPython
            # also runs the at-fork hooks libraries registered (pymongo has one)
            # in the child before exec.
            popen = subprocess.Popen(  # noqa: ASYNC220
                argv,
                env=env,
                stdin=stdin,
                stdout=write_fd,
                stderr=write_fd if err_write is None else err_write,
                close_fds=True,
                pass_fds=(*plan.pass_fds, *plan.listen_fds),
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=list(groups) if groups is not None else None,
                preexec_fn=preexec,  # noqa: PLW1509
            )
        except FileNotFoundError:
            raise SpawnError(f"program {plan.argv[0]!r} not found") from None
        except PermissionError as exc:
            raise SpawnError(f"cannot run {plan.argv[0]!r}: {exc.strerror}") from None
        except subprocess.SubprocessError:
            # The child failed before exec: the working directory (or, for a
            # socket hand-off, the program) changed since it was checked.
            raise SpawnError(
                f"cannot start {plan.argv[0]!r} in {plan.cwd!r}{_as_whom(uid)}"
            ) from None
        except (OSError, ValueError) as exc:
            raise SpawnError(f"cannot run {plan.argv[0]!r}: {exc}") from None
        finally:
            os.close(write_fd)
            if err_write is not None:
                os.close(err_write)
            if "popen" not in locals():
                for fd in (read_fd, err_read):
                    if fd is not None:
                        os.close(fd)
        output = trio.lowlevel.FdStream(read_fd) if read_fd is not None else None
        errors = trio.lowlevel.FdStream(err_read) if err_read is not None else None
        return PosixProcess(popen, output, errors)


def _as_whom(uid: int | None) -> str:
    return "" if uid is None or os.geteuid() != 0 else f" as uid {uid}"


def _check_directory(path: str, uid: int | None) -> None:
    """Raise SpawnError unless *path* is a directory the caller may enter."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except PermissionError:
        is_dir = True  # a parent cannot be searched: the access check says so
    except OSError:
        is_dir = False
    if not is_dir:
        raise SpawnError(f"working directory {path!r} does not exist")
    if not os.access(path, os.X_OK, effective_ids=True):
        raise SpawnError(f"working directory {path!r} cannot be entered{_as_whom(uid)}")


def _open_log(path: str, uid: int | None) -> int:
    """Open (create) a vassal's log file for appending; with the caller's rights."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise SpawnError(f"cannot open logto {path!r}{_as_whom(uid)}: {exc.strerror}") from None


def pid_alive(pid: int) -> bool:
    """For tests and benchmarks: whether a process (not a zombie we own) exists."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
