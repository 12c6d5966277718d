"""Shard streaming through webdataset: local globs, brace lists, pipe: commands and http shards served on
127.0.0.1 by the test, failing shards skipped and counted, shares across ranks x workers, resampling."""

import functools
import http.server
import io
import logging
import re
import socket
import tarfile
import threading
import time
from collections import Counter

import pytest

import config
from conftest import shard_dataset
from data import check_shards, make_loader
from shards import expand_shards, iter_tar
from synthetic import write_tar

SIZE = 28


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test server's access log would only clutter pytest's output
        return None


@pytest.fixture
def server(tmp_path):
    """An http server on 127.0.0.1 serving tmp_path; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def closed_port():
    """A 127.0.0.1 port nothing listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caption_shard(path, prefix, n):
    """A shard of n caption samples whose caption names the key; returns the keys."""
    keys = [f"{prefix}k{i}" for i in range(n)]
    write_tar(path, [(k, {"txt": f"sample {k}."}) for k in keys])
    return keys


def batch_keys(batches, tokenizer):
    """The keys of the samples in collated batches (read back from their captions)."""
    return [k for b in batches for ids in b["input_ids"] for k in re.findall(r"sample (\w+)\.", tokenizer.decode(ids))]


def keys_of(shards, tokenizer, **kwargs):
    ds = shard_dataset(shards, tokenizer, **{"train": False, "frame_size": SIZE, **kwargs})
    return [s["key"] for s in ds], ds.skipped


def test_local_glob_http_pipe_and_brace_list_in_one_config(tmp_path, server, tokenizer):
    keys = caption_shard(tmp_path / "a-0.tar", "a0", 2) + caption_shard(tmp_path / "a-1.tar", "a1", 2)
    keys += caption_shard(tmp_path / "web.tar", "w", 3) + caption_shard(tmp_path / "piped.tar", "p", 2)
    keys += caption_shard(tmp_path / "x-0.tar", "x0", 1) + caption_shard(tmp_path / "y-0.tar", "y0", 1)
    shards = [str(tmp_path / "a-*.tar"), f"{server}/web.tar", f"pipe:cat {tmp_path / 'piped.tar'}",
              str(tmp_path / "{x,y}-0.tar")]
    got, skipped = keys_of(shards, tokenizer)
    assert got == keys and not skipped  # every sample once, in the list's order
    check_shards(config.from_dict({"model": {"llm": "x"}, "data": {"train_shards": shards}}), "cfg.yaml")
    bad = config.from_dict({"model": {"llm": "x"}, "data": {"train_shards": [f"{server}/web.tar",
                                                                              str(tmp_path / "z-{0..1}.tar")]}})
    with pytest.raises(config.ConfigError, match=r"data.train_shards.*z-0\.tar"):
        check_shards(bad, "cfg.yaml")  # a local name that matches nothing; URLs are not checked


def test_brace_ranges_and_lists_expand_like_webdataset(tmp_path):
    for name in ("s-000.tar", "s-001.tar", "s-002.tar", "t-000.tar"):
        write_tar(tmp_path / name, [("k", {"txt": "x"})])
    with pytest.raises(FileNotFoundError, match=r"t-001\.tar \(from .*\{s,t\}"):
        expand_shards(str(tmp_path / "{s,t}-{000..001}.tar"))  # t-001 does not exist
    assert expand_shards([str(tmp_path / "s-{000..002}.tar"), str(tmp_path / "s-*.tar")]) == [
        str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]  # a shard named twice is read once
    assert expand_shards("http://127.0.0.1:1/d-{00..02}.tar") == [f"http://127.0.0.1:1/d-{i:02d}.tar" for i in range(3)]
    assert expand_shards("hf://datasets/org/set/train-{0..1}.tar")[1] == "hf://datasets/org/set/train-1.tar"


def test_key_rule_first_dot_of_the_basename(tmp_path):
    write_tar(tmp_path / "k.tar", [("dir.v1/abc", {"000.JPG": b"a", "json": b"{}"}), ("abc_000", {"jpg": b"b"})])
    got = [(key, sorted(fields)) for key, fields, _ in iter_tar(str(tmp_path / "k.tar"))]
    assert got == [("dir.v1/abc", ["000.jpg", "json"]), ("abc_000", ["jpg"])]


def test_a_repeated_field_keeps_the_first_and_warns(tmp_path, caplog):
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        for name, data in (("k.txt", b"first"), ("k.TXT", b"second"), ("j.txt", b"next")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skips = []
    with caplog.at_level(logging.WARNING, logger="fvlm.shards"):
        got = [(k, fields) for k, fields, _ in iter_tar(str(tmp_path / "d.tar"), on_skip=lambda *a: skips.append(a))]
    assert got == [("k", {"txt": b"first"}), ("j", {"txt": b"next"})] and not skips
    assert "duplicate" in caplog.text and "d.tar" in caplog.text


def test_404_and_refused_shards_are_skipped_counted_and_named(tmp_path, server, tokenizer, caplog):
    good = caption_shard(tmp_path / "g0.tar", "g0", 3) + caption_shard(tmp_path / "g1.tar", "g1", 3)
    missing, refused = f"{server}/missing.tar", f"http://127.0.0.1:{closed_port()}/g0.tar"
    shards = [f"{server}/g0.tar", missing, refused, f"{server}/g1.tar"]
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="fvlm.data"):
        got, skipped = keys_of(shards, tokenizer)
    assert time.perf_counter() - start < 20  # curl does not retry a 404 or a refused connection
    assert got == good and skipped == {"shard_unreadable": 2}
    assert missing in caplog.text and "22 (HTTP error" in caplog.text
    assert refused in caplog.text and "connection refused" in caplog.text
    # The same through loader workers: worker 0 reads g0 + refused, worker 1 missing + g1; counts ride along.
    loader = make_loader(shard_dataset(shards, tokenizer, train=False, frame_size=SIZE), batch_size=2,
                         pad_id=tokenizer.pad_token_id, num_workers=2)
    batches = list(loader)
    assert sorted(batch_keys(batches, tokenizer)) == sorted(good)
    assert sum((b["skipped"] for b in batches), start=Counter()) == {"shard_unreadable": 2}


def test_every_shard_failing_is_a_clear_error(tmp_path, server, tokenizer):
    shards = [f"{server}/nothing-0.tar", f"http://127.0.0.1:{closed_port()}/x.tar", "pipe:exit 3"]
    for train in (False, True):
        with pytest.raises(RuntimeError, match=r"every shard is unreadable: .*nothing-0\.tar, .*x\.tar, pipe:exit 3"):
            next(iter(shard_dataset(shards, tokenizer, train=train, frame_size=SIZE)))
    with pytest.raises(RuntimeError, match="every shard is unreadable"):  # resampled: once every shard was drawn
        next(iter(shard_dataset(shards, tokenizer, train=True, resampled=True, frame_size=SIZE)))


def test_a_rank_whose_whole_share_is_down_draws_from_all_shards(tmp_path, server, tokenizer, caplog):
    keys = caption_shard(tmp_path / "up.tar", "up", 4)
    shards = [f"{server}/up.tar", f"{server}/down.tar"]  # rank 1's share is the missing shard
    with caplog.at_level(logging.WARNING, logger="fvlm.shards"):
        stream = iter(shard_dataset(shards, tokenizer, train=True, frame_size=SIZE, shuffle_buffer=2, rank=1, world=2))
        got = [next(stream) for _ in range(12)]
    assert {s["key"] for s in got} == set(keys)
    assert sum((s["skipped"] for s in got), start=Counter())["shard_unreadable"] >= 1
    assert "drawing from all shards" in caplog.text
    got, skipped = keys_of(shards, tokenizer, rank=1, world=2)  # evaluation: the other rank reads the rest
    assert got == [] and skipped == {"shard_unreadable": 1}


def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path, server, tokenizer, caplog):
    write_tar(tmp_path / "full.tar", [(f"k{i}", {"txt": f"caption {i}" + "x" * 3000}) for i in range(4)])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    for shard in (str(tmp_path / "cut.tar"), f"{server}/cut.tar", f"pipe:cat {tmp_path / 'cut.tar'}"):
        got, skipped = keys_of([shard], tokenizer)
        assert got == ["k0"] and skipped == {"bad_shard": 1}, shard  # k1 was being read: dropped
    assert "cut.tar: bad_shard" in caplog.text


@pytest.mark.parametrize("n_shards", [8, 3])
def test_ranks_times_workers_read_disjoint_complete_shares(tmp_path, tokenizer, n_shards):
    every = [k for s in range(n_shards) for k in caption_shard(tmp_path / f"c-{s}.tar", f"s{s}", 4)]
    shares = []
    for rank in range(2):  # 2 ranks x 2 workers = 4 splits: whole shards (8), or interleaved samples (3)
        ds = shard_dataset(str(tmp_path / "c-*.tar"), tokenizer, train=False, frame_size=SIZE, rank=rank, world=2)
        shares.append(batch_keys(make_loader(ds, 3, tokenizer.pad_token_id, num_workers=2), tokenizer))
    assert sorted(shares[0] + shares[1]) == sorted(every) and not set(shares[0]) & set(shares[1])


def test_resampled_draws_shards_with_replacement_per_split(tmp_path, tokenizer):
    every = set(caption_shard(tmp_path / "r-0.tar", "a", 3) + caption_shard(tmp_path / "r-1.tar", "b", 5))

    def stream(rank, seed=0):
        ds = shard_dataset(str(tmp_path / "r-*.tar"), tokenizer, train=True, resampled=True, frame_size=SIZE,
                          shuffle_buffer=4, seed=seed, rank=rank, world=4)  # 4 splits, 2 shards
        it = iter(ds)
        return [next(it)["key"] for _ in range(40)]

    first = stream(rank=3)
    assert set(first) == every  # a split draws from every shard, not one share
    assert stream(rank=3) == first  # deterministic by (seed, split)
    assert stream(rank=2) != first and stream(rank=3, seed=1) != first
