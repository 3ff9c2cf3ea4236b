"""Layer buffers whose pages the reader controls: mapped on their own, faulted in ahead,
given back until written again."""

import os

import pytest
import torch

from superexperts import pages

MB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


linux = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident set size from /proc (Linux)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_empty_is_page_aligned_from_the_threshold_and_plain_below(dtype):
    big = pages.empty((3, pages.MAPPED_FROM // dtype.itemsize), dtype)
    assert big.shape == (3, pages.MAPPED_FROM // dtype.itemsize) and big.dtype == dtype and big.is_contiguous()
    assert big.data_ptr() % pages.PAGE == 0
    big.view(torch.uint8).fill_(1)  # writable
    small = pages.empty((5, 7), dtype)
    assert small.shape == (5, 7) and small.dtype == dtype
    assert pages.empty((), dtype).shape == () and pages.empty((0, 4), dtype).numel() == 0


def test_release_zeroes_whole_pages_inside_and_keeps_the_partial_ends():
    buf = pages.mapped(8 * pages.PAGE)  # page-aligned
    buf.fill_(7)
    part = buf[100 : 5 * pages.PAGE + 100]
    released = pages.release(part)
    assert released == 4 * pages.PAGE
    assert torch.all(buf[: pages.PAGE] == 7) and torch.all(buf[5 * pages.PAGE :] == 7)  # the shared end pages kept
    assert torch.all(buf[pages.PAGE : 5 * pages.PAGE] == 0)
    assert pages.release(buf[10:20]) == 0  # no whole page inside
    assert pages.release(buf.view(-1, 2)[:, 0]) == 0  # not contiguous: left alone
    assert torch.all(buf[: pages.PAGE] == 7)


@linux
def test_touch_faults_in_all_but_the_skipped_ranges_and_release_gives_them_back():
    n = 64 * MB
    buf = pages.empty((n,), torch.uint8)
    before = rss()
    pages.touch(buf, skip=[(16 * MB, 48 * MB)])
    faulted = rss() - before
    assert 28 * MB <= faulted <= 36 * MB
    pages.touch(buf)
    assert rss() - before >= 60 * MB
    assert pages.release(buf[8 * MB : 40 * MB]) == 32 * MB
    assert rss() - before <= 36 * MB


@linux
def test_a_freed_buffer_leaves_the_process():
    before = rss()
    buf = pages.empty((64 * MB,), torch.uint8)
    pages.touch(buf)
    assert rss() - before >= 60 * MB
    del buf
    assert rss() - before <= 8 * MB


def test_mapped_falls_back_to_malloc_when_no_mapping_is_left(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(pages.mmap, "mmap", refuse)
    buf = pages.mapped(3 * pages.PAGE)
    assert buf.numel() == 3 * pages.PAGE and buf.data_ptr() % pages.PAGE == 0
    buf.fill_(5)
    assert pages.release(buf) == 3 * pages.PAGE and torch.all(buf == 0)
