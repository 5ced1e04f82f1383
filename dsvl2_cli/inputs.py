"""Turn command-line inputs into documents: expand files, directories (recursive, `--glob`), `-` (paths on
stdin) and `--stdin-data` (one document's bytes on stdin); open, hash and count the pages of each document
(dsvl2_cli/pages.py renders them).

Documents are told apart by their content (a PDF header, else one of the image formats we support),
never by file name. Every problem with one input becomes that document's or page's `error`; nothing here
raises for a bad file, and nothing blocks on one: FIFOs, sockets and devices are refused unread. Output
keys are sanitised relative paths, unique within the run; `source` is the path as given, with bytes that
are not UTF-8 and control characters shown as `\\xNN` escapes, so that every output format can hold it and
no terminal interprets it.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image

from dsvl2.pipelines.base import Document

if TYPE_CHECKING:
    import pymupdf

# Pillow decoders we let near a file: the formats the CLI documents (JPEG includes cameras' MPO). Others,
# such as EPS (which Pillow hands to Ghostscript, an external program), are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "DIB", "GIF")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
DEFAULT_SUFFIXES = (".pdf", *IMAGE_SUFFIXES)
# Declared image size above which we refuse to decode (decompression bombs); below Pillow's own hard limit.
MAX_PIXELS = 150_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f/<>:"\\|?*\ufffd]')
_MAX_NAME_BYTES = 180  # leaves room for ".<task>.jsonl.partial" and similar suffixes under 255


@dataclass(frozen=True, slots=True)
class PageSelection:
    """1-based inclusive ranges from `--pages`, e.g. "1-3,7,10-" → ((1, 3), (7, 7), (10, None))."""

    ranges: tuple[tuple[int, int | None], ...]

    def select(self, n_pages: int) -> tuple[int, ...]:
        chosen: list[int] = []
        for start, end in self.ranges:
            for p in range(start, min(end or n_pages, n_pages) + 1):
                if p not in chosen:
                    chosen.append(p)
        return tuple(chosen)


def parse_pages(spec: str) -> PageSelection:
    """Parse `--pages`; raises ValueError with a message naming the bad part."""
    ranges: list[tuple[int, int | None]] = []
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", part)
        if not m:
            raise ValueError(f"{part!r} is not a page or range (use e.g. 1-3,7,10-; pages start at 1)")
        start = int(m.group(1))
        end = int(m.group(3)) if m.group(3) else (None if m.group(2) else start)
        if start < 1 or (end is not None and end < start):
            raise ValueError(f"{part!r}: pages start at 1 and a range must not run backwards")
        ranges.append((start, end))
    return PageSelection(tuple(ranges))


@dataclass(frozen=True, slots=True)
class Shard:
    """`--shard i/N`: this process takes the documents whose key hashes to i-1 modulo N."""

    index: int
    count: int

    def takes(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1


def parse_shard(spec: str) -> Shard:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"{spec!r}: expected i/N with 1 <= i <= N, e.g. 2/4")
    return Shard(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input before it is opened: a path, or bytes read from stdin."""

    source: str
    key: str
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Blob:
    """A document given as bytes rather than a path: `--stdin-data`, or bytes and images in the Python API.
    `name` is its source in records (and, sanitised, its output key)."""

    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Opened:
    """An input that has been hashed and sniffed; `pages` are the selected 1-based page numbers."""

    input: InputFile
    doc: Document
    pages: tuple[int, ...]
    warning: str | None = None  # e.g. a damaged PDF that MuPDF repaired: readable, maybe incomplete


def safe_key(parts: Sequence[str]) -> str:
    """Relative posix key from path components: no '..', no control or reserved characters, short names."""
    clean = []
    for part in parts:
        text = part.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        text = _UNSAFE.sub("_", text).strip(" .") or "_"
        raw = text.encode()
        if len(raw) > _MAX_NAME_BYTES:
            tag = hashlib.sha256(raw).hexdigest()[:10]
            text = raw[: _MAX_NAME_BYTES - 12].decode("utf-8", "ignore") + "~" + tag
        clean.append(text)
    return "/".join(clean) or "_"


def display(text: str) -> str:
    """A path for records and messages: undecodable bytes (kept by os.fsdecode as surrogates) and control
    characters (a name can hold a terminal escape sequence) as `\\xNN`."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a document without opening it (None when it is a regular file), so
    that a FIFO never blocks the run and a dangling or looping symlink gets a message that says so."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if os.path.lexists(path) and isinstance(exc, FileNotFoundError):
            return f"broken symbolic link (to {display(os.readlink(path))})"
        return "no such file or directory" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind}); use --stdin-data to read a stream"


def _unique(key: str, taken: set[str]) -> str:
    """`key`, or `stem~N.ext` when an earlier input took it (compared case-insensitively)."""
    candidate, n = key, 1
    path = PurePosixPath(key)
    while candidate.casefold() in taken:
        n += 1
        candidate = str(path.with_name(f"{path.stem}~{n}{path.suffix}"))
    taken.add(candidate.casefold())
    return candidate


def _matches(rel: str, globs: Sequence[str]) -> bool:
    if not globs:
        return rel.lower().endswith(DEFAULT_SUFFIXES)
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel if "/" in g else name, g) for g in globs)


def _walk(root: Path, globs: Sequence[str], errors: list[tuple[str, str]]) -> list[tuple[Path, list[str]]]:
    """Files under `root` sorted by relative path; hidden entries skipped, directory symlinks not followed."""

    def onerror(exc: OSError) -> None:
        errors.append((str(exc.filename), exc.strerror or str(exc)))

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).parts
        for name in filenames:
            rel = [*rel_dir, name]
            if not name.startswith(".") and _matches("/".join(rel), globs):
                found.append((Path(dirpath, name), rel))
    return sorted(found, key=lambda item: item[1])


def _arg_parts(arg: str) -> list[str]:
    """Components that keep a relative argument's tree; an absolute or '..' path keeps only its name."""
    p = PurePosixPath(arg.replace(os.sep, "/"))
    parts = [x for x in p.parts if x not in (".", "")]
    if p.is_absolute() or ".." in parts:
        return [p.name or "_"]
    return parts


def expand_inputs(
    args: Sequence[str | Blob],
    *,
    globs: Sequence[str] = (),
    stdin_paths: Iterable[str] = (),
    stdin_data: bytes | None = None,
) -> tuple[list[InputFile], list[str]]:
    """Inputs in a stable order with unique keys, and warnings (duplicates, unreadable directories).
    `stdin_paths` replaces the first `-` argument; a `Blob` is one document as it is."""
    files: list[InputFile] = []
    warns: list[str] = []
    taken: set[str] = set()
    seen: set[str] = set()

    def add(source: str, parts: list[str], path: Path | None = None, error: str | None = None) -> None:
        if path is not None and error is None:
            error = path_problem(path)
        if path is not None and error is None:
            real = os.path.realpath(path)
            if real in seen:
                warns.append(f"{display(source)}: given more than once; processed once")
                return
            seen.add(real)
        files.append(InputFile(display(source), _unique(safe_key(parts), taken), path, error=error))

    if stdin_data is not None:
        files.append(InputFile("-", _unique("stdin", taken), data=stdin_data))
    for arg in args:
        if isinstance(arg, Blob):
            files.append(InputFile(display(arg.name), _unique(safe_key([arg.name]), taken), data=arg.data))
            continue
        if arg == "-":
            for line in stdin_paths:
                if line.strip():
                    add(line, _arg_parts(line), Path(line))
            continue
        path = Path(arg)
        if path.is_dir():
            errors: list[tuple[str, str]] = []
            found = _walk(path, globs, errors)
            for file, rel in found:
                add(str(file), rel, file)
            if not found and not errors:
                wanted = f"files matching {', '.join(globs)}" if globs else "PDF or image files"
                warns.append(f"{display(arg)}: no {wanted} in this directory")
            for where, why in errors:  # an unreadable directory must not vanish without a word
                inside = Path(where).is_relative_to(path)
                parts = list(Path(where).relative_to(path).parts) if inside else _arg_parts(where)
                add(where, parts or [path.name], error=f"unreadable directory: {why}")
        else:
            add(arg, _arg_parts(arg), path)
    return files, warns


def read_path_list(data: bytes) -> list[str]:
    """Paths from stdin: NUL-separated when the data holds a NUL (find -print0), else one per line."""
    text = os.fsdecode(data)
    return [p for p in (text.split("\0") if "\0" in text else text.splitlines()) if p]


def _sha256(file: InputFile) -> str:
    h = hashlib.sha256()
    if file.data is not None:
        h.update(file.data)
    else:
        assert file.path is not None
        with open(file.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _head(file: InputFile) -> bytes:
    if file.data is not None:
        return file.data[:1024]
    assert file.path is not None
    with open(file.path, "rb") as f:
        return f.read(1024)


def open_pdf(file: InputFile, password: str | None) -> pymupdf.Document:
    import pymupdf  # imported on first use: it costs about a second, which `--help` should not pay

    try:
        if file.data is not None:
            doc = pymupdf.open(stream=file.data, filetype="pdf")
        else:
            doc = pymupdf.open(file.path, filetype="pdf")
    except pymupdf.FileDataError as exc:
        raise ValueError(f"damaged beyond repair, MuPDF cannot read it ({exc})") from None
    if doc.needs_pass and not doc.authenticate(password or ""):
        doc.close()
        raise ValueError("encrypted PDF: " + ("wrong --password" if password else "needs --password"))
    return doc


def check_size(image: Image.Image) -> None:
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"image is {w}x{h} pixels, over the limit of {MAX_PIXELS:,}")


def open_image(file: InputFile) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides below
            image = Image.open(io.BytesIO(file.data) if file.data is not None else file.path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, above ours: same message
        raise ValueError(f"image is over the limit of {MAX_PIXELS:,} pixels ({exc})") from None
    try:
        check_size(image)
    except ValueError:
        image.close()
        raise
    return image


def open_document(file: InputFile, *, password: str | None, pages: PageSelection | None) -> Opened:
    """Hash and sniff one input and count its pages; failures become `Document.error`."""
    if file.error is not None:
        return Opened(file, Document(file.source, file.key, error=file.error), ())
    warning = None
    try:
        sha = _sha256(file)
        if b"%PDF-" in _head(file):
            with open_pdf(file, password) as pdf:
                kind, n = "pdf", pdf.page_count
                if pdf.is_repaired:
                    warning = f"{file.source}: damaged PDF repaired on opening; some pages may be blank or incomplete"
        else:
            with open_image(file) as image:
                kind, n = "image", (getattr(image, "n_frames", 1) if image.format == "TIFF" else 1)
    except Exception as exc:
        unknown = isinstance(exc, Image.UnidentifiedImageError)
        reason = "not a PDF or an image in a supported format (PNG, JPEG, WebP, TIFF, BMP, GIF)" if unknown else exc
        return Opened(file, Document(file.source, file.key, error=f"cannot open: {reason}"), ())
    if n < 1:
        doc = Document(file.source, file.key, sha, kind, 0, error="the document has no pages")
        return Opened(file, doc, (), warning)
    selected = pages.select(n) if pages else tuple(range(1, n + 1))
    return Opened(file, Document(file.source, file.key, sha, kind, n), selected, warning)
