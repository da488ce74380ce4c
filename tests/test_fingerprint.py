"""The data fingerprint: contents, not dates; fingerprints from before content hashing still compare."""

from __future__ import annotations

import os
import shutil

from histossl.data import fingerprint as fp
from histossl.data.sources import load_index


def test_a_copy_has_the_same_fingerprint_and_an_edit_another(tmp_path, tiny_folder):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy, copy_function=shutil.copyfile)  # new modification times
    first, second = fp.fingerprint(load_index(tiny_folder, labels=False)), fp.fingerprint(load_index(copy, labels=False))
    assert first["digest"] == second["digest"] and first["content"]
    image = next(copy.rglob("*.png"))
    data = bytearray(image.read_bytes())
    data[-13] ^= 1  # same size, other bytes
    image.write_bytes(bytes(data))
    assert fp.fingerprint(load_index(copy, labels=False))["digest"] != first["digest"]


def test_hashes_are_reused_for_files_whose_size_and_date_are_unchanged(tmp_path, tiny_folder):
    index = load_index(tiny_folder, labels=False)
    files = fp.listing(index)
    rel = next(iter(files))
    size, mtime, _ = files[rel]
    cached = fp.listing(index, {**files, rel: (size, mtime, "from-the-cache")})
    assert cached[rel][2] == "from-the-cache"  # not read again
    assert fp.listing(index, {**files, rel: (size, mtime + 1, "from-the-cache")})[rel][2] == files[rel][2]  # read again


def test_a_fingerprint_from_before_content_hashing_compares_by_paths_and_sizes(tmp_path, tiny_folder):
    out = tmp_path / "out"
    index = load_index(tiny_folder, labels=False)
    files = fp.listing(index)
    now = fp.fingerprint(index, files)
    fp.save_listing(out, "target", now, files)
    old = {"path": now["path"], "n_images": now["n_images"], "digest": "0123456789abcdef"}  # sizes and dates hashed
    legacy = out / fp.FOLDER / "target-0123456789abcdef.tsv"
    legacy.write_text("".join(f"{rel}\t{size}\t{mtime - 5}\n" for rel, (size, mtime, _) in sorted(files.items())))
    assert not fp.differs(old, now, out, "target")  # other dates only: a copy
    assert not fp.differs({k: v for k, v in old.items() if k != "digest"}, now, out, "target")  # no fingerprint: unknown
    rel = sorted(files)[0]
    legacy.write_text(legacy.read_text().replace(f"{rel}\t{files[rel][0]}\t", f"{rel}\t{files[rel][0] + 1}\t"))
    os.utime(legacy, ns=(0, 10**9))  # the listing is cached by its date
    assert fp.differs(old, now, out, "target")  # a size changed
    assert "1 modified" in fp.describe_change(out, "target", old, now, files)
    assert fp.differs({**old, "n_images": now["n_images"] + 1}, now)  # another count, even without a listing
    assert fp.differs({**now, "digest": "fedcba9876543210"}, now)  # content fingerprints: the digest decides
