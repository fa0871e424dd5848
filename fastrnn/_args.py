"""argparse types shared by the command-line tools (fastrnn.cli, fastrnn.bench): numbers
checked against a range, so a bad value is a one-line argparse error, not a traceback."""
import argparse
import errno
import os


def _number(kind, low, high=None, low_open=False, high_open=True):
    """argparse type: a ``kind`` (int/float) number in [low, high) (ends as flagged)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        ok = value == value and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok or (kind is float and value in (float("inf"), float("-inf"))):
            span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" \
                   f"{')' if high_open or high is None else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {span}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0, low_open=True)
NON_NEGATIVE = _number(float, 0)
FRACTION = _number(float, 0, 1)  # [0, 1)


def output_path_problem(path):
    """Why a file cannot be written at ``path`` (a str), as (errno, reason), or None: it is a
    folder, or its folder does not exist or is not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return errno.EISDIR, "it is a folder; give a file name"
    if not os.path.isdir(folder):
        return errno.ENOENT, f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return errno.EACCES, f"the folder {folder} is not writable"
    return None


def OUTPUT_FILE(text):
    """argparse type: a path to write at the end of a run, checked now (see
    output_path_problem), so a typo fails at once rather than after the training or
    benchmark it would have saved."""
    problem = output_path_problem(text) if text else None
    if problem:
        raise argparse.ArgumentTypeError(problem[1])
    return text


OUTPUT_FILE.__name__ = "path"

# What matplotlib's savefig writes by the file name's extension, without other programs
# (its "pgf" needs LaTeX).
IMAGE_EXTENSIONS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff",
                    "webp")


def IMAGE_FILE(text):
    """argparse type: OUTPUT_FILE whose extension matplotlib can write ("" passes: none)."""
    text = OUTPUT_FILE(text)
    extension = os.path.splitext(text)[1].lstrip(".").lower()
    if text and extension not in IMAGE_EXTENSIONS:
        raise argparse.ArgumentTypeError(f"{text}: the image format comes from the extension, "
                                         f"one of {', '.join(IMAGE_EXTENSIONS)}")
    return text


IMAGE_FILE.__name__ = "image path"
