"""A real full disk: extraction into a small tmpfs stops with a clear error, keeps what it wrote, and resumes to the
same bytes once there is room. The tmpfs is mounted in a private mount namespace (``unshare``), so the test needs
no privileges on machines that allow user namespaces, and skips with the reason where none is allowed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from toy_stores import store_files

from stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]


def _namespace_prefix(probe_dir: Path) -> list[str] | None:
    """``unshare`` arguments under which ``mount -t tmpfs`` works, or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    probe_dir.mkdir(exist_ok=True)
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{probe_dir}'"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # same numerics in one process and in ranks


def _extract_on_a_small_disk(tmp_path: Path, encoder: str, items: int, launcher: list[str],
                             room: float) -> tuple[Path, Path]:
    """Extract ``items`` captions (through ``launcher``: python, or torchrun) into a tmpfs with ``room`` times the
    size of the finished store, then again after growing it. Returns the reference store (one process, plenty of
    disk) and the folder holding first/second.err and .rc and copies of the store after each run (partial,
    resumed). Skips where no tmpfs can be mounted."""
    prefix = _namespace_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (no unshare/mount, or user and mount namespaces are not allowed)")
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{i}", "text": f"caption number {i} " * (1 + i % 5)}) + "\n"
                                for i in range(items)))
    args = ["cli.py", "extract", "--modality", "text", "--encoder", encoder, "--manifest", str(manifest),
            "--batch-size", "8", "--shard-mb", "0.02", "--workers", "0", "--store"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, *args, str(reference)], cwd=REPO, check=True, capture_output=True, env=ENV)
    size = sum(len(b) for b in store_files(reference).values())

    mount, out = tmp_path / "small-disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    q = lambda p: f"'{p}'"  # noqa: E731 - quoting for the shell script below
    command = " ".join(q(a) for a in [*launcher, *args])
    script = "\n".join([
        f"mount -t tmpfs -o size={int(size * room) // 1024 + 16}k tmpfs {q(mount)} || exit 90",
        f"{command} {q(mount / 's')} > {q(out / 'first.err')} 2>&1; echo $? > {q(out / 'first.rc')}",
        f"cp -r {q(mount / 's')} {q(out / 'partial')}",
        f"mount -o remount,size={6 * size // 1024 + 1024}k {q(mount)}",
        f"{command} {q(mount / 's')} > {q(out / 'second.err')} 2>&1; echo $? > {q(out / 'second.rc')}",
        f"cp -r {q(mount / 's')} {q(out / 'resumed')}",
    ])
    done = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert done.returncode == 0, done.stderr
    return reference, out


def test_a_full_disk_stops_cleanly_and_the_store_resumes_to_the_same_bytes(tmp_path, tiny_text_model):
    reference, out = _extract_on_a_small_disk(tmp_path, tiny_text_model, 400, [sys.executable], room=0.5)
    first = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first
    assert "is full" in first and "run the same command again to resume" in first and "Traceback" not in first
    partial = FeatureStore.open(out / "partial", allow_incomplete=True)  # only the items of whole shards
    kept = int(first.split("The ")[1].split(" items written before are on disk")[0])  # staging parts count too
    assert 0 < len(partial) <= kept < 400
    whole = FeatureStore.open(reference)
    assert partial.ids == whole.ids[: len(partial)]
    some = list(range(0, len(partial), 7))
    assert partial.get_batch(some)[0].equal(whole.get_batch(some)[0])  # what fitted is intact

    second = (out / "second.err").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second
    assert "resuming at item" in second
    assert store_files(out / "resumed") == store_files(reference)
    assert FeatureStore.open(out / "resumed").ids == [f"c{i}" for i in range(400)]


def test_a_full_disk_under_torchrun_stops_cleanly_and_resumes_to_the_same_bytes(tmp_path, tiny_text_model):
    """The same with two torchrun ranks: the rank that hits the full disk stops the job with the one-line error,
    the finished parts and shards stay, and the same command resumes to a one-process store's bytes."""
    # parts are staged beside the final shards, so a run needs about twice the store: give it about one store
    reference, out = _extract_on_a_small_disk(
        tmp_path, tiny_text_model, 200, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                         "--standalone"], room=1.0)
    first = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() != "0", first[-3000:]
    assert "is full" in first and "Every finished part and shard is kept" in first, first[-3000:]
    second = (out / "second.err").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second[-3000:]
    assert "resuming" in second
    assert store_files(out / "resumed") == store_files(reference)


def _in_namespace(tmp_path: Path, script: str) -> None:
    prefix = _namespace_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no unshare/mount, or user and mount namespaces are not allowed)")
    done = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert done.returncode == 0, done.stderr


def test_a_full_disk_during_finish_is_one_line_releases_the_lock_and_resumes(tmp_path):
    """The plugin fills the disk once the last item is encoded: the 64 MB shard is first written by ``finish``."""
    plugin = tmp_path / "disk_filling_plugin.py"
    shutil.copy(REPO / "tests" / "disk_filling_plugin.py", plugin)
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{i}", "text": "word " * (1 + i % 4)}) + "\n" for i in range(40)))
    args = ["cli.py", "extract", "--modality", "text", "--encoder", f"{plugin}:load", "--manifest", str(manifest),
            "--batch-size", "8", "--workers", "0", "--store"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, *args, str(reference)], cwd=REPO, check=True, capture_output=True, env=ENV)
    mount, out = tmp_path / "small-disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    command = " ".join(f"'{a}'" for a in [sys.executable, *args, str(mount / "s")])
    _in_namespace(tmp_path, "\n".join([
        f"mount -t tmpfs -o size=4m tmpfs '{mount}' || exit 90",
        f"FILL_DISK_AT='{mount}' {command} > '{out}/first.err' 2>&1; echo $? > '{out}/first.rc'",
        f"cp -r '{mount}/s' '{out}/partial'",
        f"rm '{mount}/filler'",
        f"{command} > '{out}/second.err' 2>&1; echo $? > '{out}/second.rc'",
        f"cp -r '{mount}/s' '{out}/resumed'",
    ]))
    first = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first
    assert "is full" in first and "run the same command again to resume" in first and "Traceback" not in first
    assert not (out / "partial" / ".writer.lock").exists()  # the failed finish released its lock
    second = (out / "second.err").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second
    assert store_files(out / "resumed") == store_files(reference)


def test_a_read_only_file_system_is_one_line_and_changes_nothing(tmp_path, tiny_text_model, text_manifest):
    mount, out = tmp_path / "ro-disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    extract = " ".join(f"'{a}'" for a in [sys.executable, "cli.py", "extract", "--modality", "text", "--encoder",
                                          tiny_text_model, "--manifest", text_manifest, "--batch-size", "2",
                                          "--shard-mb", "0.001", "--store"])
    flip = (f"{sys.executable} -c \"import sys; p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[-9] ^= 1; "
            "open(p, 'wb').write(bytes(b))\"")
    _in_namespace(tmp_path, "\n".join([
        f"mount -t tmpfs -o size=4m tmpfs '{mount}' || exit 90",
        f"{extract} '{mount}/s' > /dev/null 2>&1 || exit 91",
        f"{flip} '{mount}/s/tokens/c/0/0'",
        f"cp -r '{mount}/s' '{out}/before'",
        f"mount -o remount,ro '{mount}' || exit 92",
        f"{extract} '{mount}/new' > '{out}/new.err' 2>&1; echo $? > '{out}/new.rc'",
        f"{sys.executable} cli.py stores verify '{mount}/s' --repair > '{out}/repair.err' 2>&1; "
        f"echo $? > '{out}/repair.rc'",
        f"cp -r '{mount}/s' '{out}/after'",
    ]))
    for name in ("new", "repair"):
        err = (out / f"{name}.err").read_text()
        assert (out / f"{name}.rc").read_text().strip() == "1", err
        assert "Read-only file system" in err and "Traceback" not in err, err
    assert "cannot create a store at" in (out / "new.err").read_text()
    assert store_files(out / "after") == store_files(out / "before")
