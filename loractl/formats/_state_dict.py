"""Bare state dicts (torchtune native, loralib): a safetensors file or a torch pickle.

Pickles are only ever loaded with `torch.load(weights_only=True)`, and only when the user
passed `--allow-pickle`. Detection must not unpickle at all: `pickle_strings` walks the
opcodes of a torch zip checkpoint's `data.pkl` with `pickletools`, which executes nothing,
and returns the string constants, among them every key of the state dict.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, PickleRefusedError
from ..io.safetensors_header import is_safetensors, read_header

if TYPE_CHECKING:
    import torch

MAX_ZIP_ENTRIES = 200_000  # a torch zip holds one entry per storage; parsing 200,000 takes about a second
_EOCD_SPAN = 22 + 0xFFFF + 20 + 56  # the record, its longest comment, the zip64 locator and record
_MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds names and storage ids only; anything bigger is not a checkpoint


def sniff_keys(path: Path) -> list[str] | None:
    """Tensor keys of a safetensors file, or candidate keys (string constants) of a torch zip pickle."""
    if not path.is_file():
        return None
    if is_safetensors(path):
        try:
            return list(read_header(path).tensors)
        except FormatError:
            return None
    return pickle_strings(path)


def pickle_strings(path: Path) -> list[str] | None:
    """The string constants of a torch zip checkpoint's pickle, without unpickling it; None if not one."""
    try:
        if not zipfile.is_zipfile(path) or (zip_entries(path) or 0) > MAX_ZIP_ENTRIES:
            return None
        with zipfile.ZipFile(path) as z:
            member = next((i for i in z.infolist() if i.filename.endswith("data.pkl")), None)
            if member is None or member.file_size > _MAX_PICKLE_BYTES:
                return None
            data = z.read(member)
        return [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    except (OSError, zipfile.BadZipFile, ValueError, pickle.PickleError, EOFError):
        return None


def zip_entries(path: Path) -> int | None:
    """The entry count a zip's end-of-central-directory record declares (zip64 too), read from the file's
    tail: checked before `zipfile` parses a directory of millions of entries. None if there is no record."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - _EOCD_SPAN))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    (count,) = struct.unpack_from("<H", tail, at + 10)
    locator = at - 20  # a zip64 file: the count is in the zip64 record the locator points to
    if count == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        (record,) = struct.unpack_from("<Q", tail, locator + 8)
        at64 = record - (size - len(tail))  # the record's place in `tail`
        if at64 >= 0 and at64 + 40 <= len(tail):
            (count,) = struct.unpack_from("<Q", tail, at64 + 32)
    return int(count)


def load_entries(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a state dict file, and the non-tensor values beside them (e.g. a stored alpha).

    A pickle holding `{"model_state_dict": {...}, ...}` (microsoft/LoRA's NLG scripts) is unwrapped.
    """
    if is_safetensors(path):
        from ..io.checkpoint import Checkpoint
        from ._modules import MAX_FACTOR_ELEMENTS

        huge = [(k, t.shape) for k, t in read_header(path).tensors.items() if t.numel > MAX_FACTOR_ELEMENTS]
        if huge:
            raise FormatError(
                f"tensor {huge[0][0]!r} is {list(huge[0][1])}: more than {MAX_FACTOR_ELEMENTS:,} elements",
                path=path,
                hint="no LoRA factor is that large: the header does not describe an adapter",
            )
        with Checkpoint(path) as ckpt:
            return {name: ckpt.get(name) for name in ckpt.names}, {}
    obj = load_pickle(path, allow_pickle)
    import torch

    if not isinstance(obj, dict):
        raise FormatError("pickle does not hold a dict", path=path)
    nested = obj.get("model_state_dict")
    extras = {str(k): v for k, v in obj.items() if not isinstance(v, (torch.Tensor, dict))}
    state = nested if isinstance(nested, dict) else obj
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}, extras


def load_pickle(path: Path, allow_pickle: bool) -> Any:
    """`torch.load(weights_only=True)`, refused unless `allow_pickle`; any unpickling failure is a `FormatError`."""
    if not allow_pickle:
        raise PickleRefusedError(
            "the file is a torch pickle; loractl does not unpickle by default",
            path=path,
            hint="pass --allow-pickle if you trust the file (it is loaded with weights_only=True)",
        )
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's weights-only unpickler on a hostile file: any failure is the file's
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise FormatError(f"cannot load pickle safely ({first})", path=path) from None


def save_pickle(path: Path, obj: Any) -> None:
    """`torch.save` through bytes written here: a full disk raises OSError (ENOSPC/EFBIG), not an opaque RuntimeError."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())
