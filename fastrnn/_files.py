"""Files written atomically: a crash, a full disk or Ctrl-C never leaves a half-written file
at the destination (model checkpoints, benchmark reports, plots)."""
import os
import stat
import tempfile


def _new_file_mode():
    """The mode open() gives a new file: 0666 less the umask (which can only be read by
    setting it, so this runs once, at import, not while other threads may create files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()


def _fsync_folder(folder):
    """Flush a folder's entries to disk (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(exc, what, path):
    """The OSError ``exc`` again, saying "cannot {what} to {path}" (not a temporary name)."""
    return type(exc)(exc.errno, f"cannot {what} to {path}: {exc.strerror}", path)


def _mode_for(target, new_file):
    """Permission bits for ``new_file`` (an open descriptor) about to replace ``target``:
    target's own when it exists with new_file's owner and group, else a new file's."""
    try:
        old = os.stat(target)
    except FileNotFoundError:
        return _NEW_FILE_MODE
    new = os.fstat(new_file)
    if (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
        return _NEW_FILE_MODE
    return stat.S_IMODE(old.st_mode)


def write_atomically(path, write, what="write"):
    """Call ``write(f)`` on a binary file object, then put what it wrote at ``path``.

    Written to a temporary file in the same folder, flushed, then renamed over ``path``, so
    ``path`` holds either its old content or the complete new one. It gets the permission
    bits open() would leave, an existing file's own, where it also keeps that file's owner
    and group (the writer's own file, say); else those of a new file (0o666 less the
    umask), since a renamed file is the writer's, and another owner's bits could lock that
    owner out or open the file to another group. Being a new file under the old name, it
    is not another name of an existing file's hard links (they keep the old content). An
    OSError names ``path`` (not the temporary file) and says
    "cannot {what} to {path}"; on any failure the temporary file is removed. As open()
    would: a symbolic link is followed (its target is replaced, the link kept), and
    something that exists but is no regular file (/dev/stdout, a pipe) is written to
    directly, where a rename could only replace it.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        try:
            with open(path, "wb") as f:
                write(f)
        except OSError as exc:
            raise _naming(exc, what, path) from None
        return path
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.",
                                   suffix=".tmp")
    except OSError as exc:
        raise _naming(exc, what, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            mode = _mode_for(target, f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates it 0600
        os.replace(tmp, target)
        _fsync_folder(folder)  # the rename itself survives a crash
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:  # a full disk, say
            raise _naming(exc, what, path) from None
        raise
    return path


def save_figure(fig, path, **options):
    """``fig.savefig`` to ``path`` atomically, in the format its extension names
    (matplotlib cannot tell the format from a file object)."""
    extension = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    return write_atomically(path, lambda f: fig.savefig(f, format=extension, **options),
                            "save the figure")
