"""The benchmark harness runs and reports ratios (no timing is asserted)."""
import pytest

from s4nd_vision.bench.benchmark import bench_layers, bench_models, bench_scaling, format_table, parse_pair


def test_parse_pair():
    assert parse_pair('vit_s4nd_small_patch16_224,mixer=1d:vit_small_patch16_224') == (
        'vit_s4nd_small_patch16_224', {'mixer': '1d'}, 'vit_small_patch16_224')
    assert parse_pair('a:b') == ('a', {}, 'b')
    with pytest.raises(ValueError, match='NAME'):
        parse_pair('convnext_s4nd_tiny')
    with pytest.raises(ValueError, match='key=value'):
        parse_pair('a,mixer:b')


def test_bench_rows_hold_ratios():
    rows = bench_layers(batch_size=1, stages=((8, 7),), repeats=1)
    rows += bench_models(pairs=[('convnext_s4nd_atto', {}, 'convnext_atto')], img_size=32, batch_size=1, repeats=1)
    for row in rows:
        ratios = [k for k in row if k.endswith('ratio')]
        assert ratios and all(row[k] > 0 for k in ratios)
    table = format_table(rows[:1])
    assert 'layer 1x8x7x7' in table and 'time_ratio' in table


def test_scaling_rows_hold_growth():
    rows = bench_scaling(batch_size=1, dim=4, sizes=(6, 12, 24), repeats=1)
    assert [r['case'] for r in rows] == ['layer 1x4x6x6', 'layer 1x4x12x12', 'layer 1x4x24x24']
    for prev, row in zip(rows, rows[1:]):
        assert row['s4nd_growth'] == row['s4nd_ms'] / prev['s4nd_ms'] and row['baseline_growth'] > 0


def test_keep_freed_memory_on_glibc():
    import platform
    from s4nd_vision.utils.runtime import keep_freed_memory
    expected = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
    assert keep_freed_memory() is expected
