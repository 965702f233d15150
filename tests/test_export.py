"""Export and compilation: the real-arithmetic reference path equals the fast path, and whole models export
to torch.export / ONNX with dynamic H and W and compile once for every size."""
import collections
import copy
import functools
import json
import os
import re
import types

import pytest
import timm
import torch

import s4nd_vision  # noqa: F401  (registers the models)
from s4nd_vision.deploy.export import export_onnx, model_stride, onnx_latency, onnx_metadata
from s4nd_vision.layers import S4ND, SSMKernel, ops
from s4nd_vision.layers.reference import separable_conv_reference, ssm_kernel_reference
from s4nd_vision.layers.ssm_kernel import ssm_kernels


def _params(kernel: SSMKernel):
    return kernel.log_dt, kernel.log_a_real, kernel.a_imag, kernel.b, kernel.c


@pytest.mark.parametrize('init', ['lin', 'inv', 'legs'])
@pytest.mark.parametrize('bandlimit', [None, 0.5])
def test_reference_kernel_equals_fast_kernel_and_its_gradients(init, bandlimit):
    torch.manual_seed(0)
    kernel = SSMKernel(5, d_state=8, num_kernels=2, init=init, dt_min=0.05, dt_max=0.5, bandlimit=bandlimit).double()
    with torch.no_grad():
        kernel.b.add_(0.3 * torch.randn_like(kernel.b))
    for length, rate in [(9, 1.0), (17, 0.45)]:
        fast = ssm_kernels([kernel], [length], [rate], torch.float64)[0]
        mask = None if bandlimit is None else kernel.mode_mask().double()
        ref = ssm_kernel_reference(*_params(kernel)[:4], kernel.c_pairs, length, rate, mask=mask)
        torch.testing.assert_close(ref, fast, rtol=1e-10, atol=1e-12)
        weight = torch.randn_like(fast)
        grads_fast = torch.autograd.grad((fast * weight).sum(), _params(kernel))
        grads_ref = torch.autograd.grad((ref * weight).sum(), _params(kernel))
        for g_ref, g_fast in zip(grads_ref, grads_fast):
            torch.testing.assert_close(g_ref, g_fast, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('log_a_real', [-50.0, -60.0])
def test_reference_kernel_equals_fast_kernel_at_a_tiny_decay_rate(log_a_real):
    """Re A = -exp(log_a_real) near 0 on a mode with Im A = 0 (S4D-Lin's first): in float32 |A|^2 underflows (to a
    wrong value, then to 0) where the fast path's complex division does not; the reference scales A first."""
    torch.manual_seed(0)
    kernel = SSMKernel(2, d_state=4, num_kernels=2, init='lin', dt_min=0.1, dt_max=0.1)
    with torch.no_grad():
        kernel.log_a_real[:, 0] = log_a_real
        fast = ssm_kernels([kernel], [16], [1.0])[0]
        ref = ssm_kernel_reference(*_params(kernel)[:4], kernel.c_pairs, 16)
    torch.testing.assert_close(ref, fast, rtol=1e-5, atol=1e-5 * fast.abs().max().item())


@pytest.mark.parametrize('log_a_real', [-10.0, -40.0])
def test_fast_kernel_gradients_of_a_mode_with_small_dt_a(log_a_real):
    """de/dA of e = expm1(dt A) / A, a difference of two terms that cancel for small |dt A| (float32 relative
    error eps / |dt A|), is summed as a series there: the float32 gradients equal the float64 ones (their Im A
    gradient was 3e-3 off at log_a_real -10 and all wrong at -40), and float64's equal finite differences (it gave
    exactly 0 at -40)."""
    torch.manual_seed(0)
    kernel = SSMKernel(2, d_state=4, num_kernels=1, init='lin', dt_min=0.1, dt_max=0.1)
    with torch.no_grad():
        kernel.log_a_real[:, 0] = log_a_real  # (S4D-Lin's first mode: Im A = 0)
    double = copy.deepcopy(kernel).double()
    weight = torch.randn(1, 2, 6, dtype=torch.float64)
    (kernel(6) * weight.float()).sum().backward()
    (double(6, dtype=torch.float64) * weight).sum().backward()
    for name in ('log_dt', 'log_a_real', 'a_imag', 'b', 'c'):
        got, want = getattr(kernel, name).grad.double(), getattr(double, name).grad
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    with torch.no_grad():
        step, losses = 1e-7, []
        for sign in (1, -1):
            double.a_imag[0, 0] += sign * step
            losses.append((double(6, dtype=torch.float64) * weight).sum().item())
            double.a_imag[0, 0] -= sign * step
    assert double.a_imag.grad[0, 0].item() == pytest.approx((losses[0] - losses[1]) / (2 * step), rel=1e-5)


@pytest.mark.parametrize('ndim,sizes,pool', [
    (1, (13,), (1,)), (1, (12,), (3,)), (2, (6, 9), (1, 1)), (2, (8, 7), (2, 2)), (3, (4, 5, 6), (1, 2, 2))])
def test_reference_conv_equals_separable_conv(ndim, sizes, pool):
    torch.manual_seed(0)
    u = ops.channel_major(torch.randn(2, 3, *sizes, dtype=torch.float64))
    kernels = [torch.randn(2, 3, 2 * n - 1, dtype=torch.float64) for n in sizes]
    skip = torch.randn(3, dtype=torch.float64)
    dims = list(range(1, ndim)) + [ndim + 1]
    inputs = [u, skip, *kernels]
    for t in inputs:
        t.requires_grad_(True)
    expected = ops.separable_conv(u, kernels, pool, skip=skip)
    got = separable_conv_reference(u, kernels, dims, pool, skip=skip)
    torch.testing.assert_close(got, expected)
    weight = torch.randn_like(expected)
    for g_ref, g_fast in zip(torch.autograd.grad((got * weight).sum(), inputs),
                             torch.autograd.grad((expected * weight).sum(), inputs)):
        torch.testing.assert_close(g_ref, g_fast)


def test_compiled_layer_and_model_trace_one_graph_for_every_size():
    """torch.compile(dynamic=True) runs three sizes with no recompilation, and matches eager.

    Like for any CNN, some size changes still recompile on the CPU, for reasons outside S4ND: a first
    square input (duck sizing guards H == W), a stage grid of 1 or 2 (0/1 specialization of n - 1), and
    PyTorch's CPU conv backend choice, which guards on C * H * W <= 20480 for timm's strided convs; the
    sizes here stay on one side of all three."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64, depths=(1, 0, 0, 0)).eval()
    assert _graphs_compiled(model, [(1, 3, 256, 288), (1, 3, 320, 256), (1, 3, 288, 352)], atol=1e-4) == 1


def _graphs_compiled(model, shapes, atol):
    """How many graphs torch.compile(dynamic=True, fullgraph=True) captures for `model` over inputs of `shapes`,
    each run checked against eager."""
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(*shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=atol)
    return len(frames)


@pytest.mark.parametrize('pad', [False, True], ids=['multiples', 'padded'])
def test_compiled_vit_traces_one_graph_for_every_size(pad):
    """ViT-S4ND under torch.compile(dynamic=True) compiled a graph per input size: timm's PatchEmbed asserts the sides
    are multiples of the patch with messages that format them, which specialized the graph to the traced sides (past
    torch's recompile limit the model ran in eager mode; strict torch.export refused dynamic sides); the model checks
    them itself, and pads without them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('vit_s4nd_atto_patch16_224', img_size=64, depth=1, dynamic_img_pad=pad).eval()
    assert _graphs_compiled(model, [(2, 3, 48, 64), (2, 3, 80, 48), (2, 3, 96, 112)], atol=1e-5) == 1
    # torch.export's strict mode (dynamo) refused dynamic sides for the same reason ('Constraints violated')
    dims = {2: 16 * torch.export.Dim('h', min=3, max=8), 3: 16 * torch.export.Dim('w', min=3, max=8)}
    program = torch.export.export(model, (torch.randn(2, 3, 48, 64),), dynamic_shapes=(dims,), strict=True)
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
    if not pad:  # (the model's own check of the sides, which timm's asserts repeated)
        with pytest.raises(ValueError, match=r'input sides must be positive multiples of the patch size \(16, 16\)'):
            model(torch.randn(2, 3, 72, 64))


def _count(gm: torch.fx.GraphModule, *targets) -> int:
    """The nodes of a captured graph and its submodules that call one of `targets`."""
    return sum(n.target in targets for _, m in gm.named_modules() for n in m.graph.nodes)


def _sines(gm: torch.fx.GraphModule) -> int:
    """The sin nodes of a captured graph (one per reference generation)."""
    return _count(gm, torch.sin, 'sin', torch.ops.aten.sin.default)


def test_captured_inference_generates_every_layers_kernels_together():
    """A graph that torch.compile or torch.export captures has no kernel cache (it generates every kernel per
    call), so inference stacks the generation like a training step: one reference generation per distinct axis
    length and rate, not one per layer, and its two-sided kernels are made a stacked run at a time (one flip per
    run of bidirectional entries sharing a size, not per entry); eager inference on the CPU still caches per layer."""
    from s4nd_vision.layers import kernels_can_be_prepared
    torch.manual_seed(0)
    model = timm.create_model('convnext_s4nd_atto', img_size=64)
    x = torch.randn(2, 3, 64, 64)
    sines, flips = {}, {}

    def compile_(train):
        torch._dynamo.reset()
        model.train(train)

        def backend(gm, example_inputs):
            sines[train] = _sines(gm)
            flips[train] = _count(gm, torch.flip, 'flip')
            return gm.forward
        with torch.set_grad_enabled(train):
            return torch.compile(model, backend=backend, fullgraph=True)(x)

    out = compile_(False)
    compile_(True)
    model.eval()
    exported = torch.export.export(model, (x,))
    layers = sum(isinstance(m, S4ND) for m in model.modules())
    assert 0 < sines[False] == sines[True] == _sines(exported.graph_module) < layers
    entries = sum(m.ndim for m in model.modules() if isinstance(m, S4ND))
    assert 0 < flips[False] == flips[True] < layers < entries
    with torch.no_grad():
        assert not kernels_can_be_prepared(model)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_inductor_compiles_the_layer_without_complex_ops():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=8, l_ref=8, pool=2)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    x = torch.randn(2, 4, 8, 10, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    expected = torch.autograd.grad(layer(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,stride', [('convnext_s4nd_atto', 32), ('vit_s4nd_atto_patch16_224', 16)])
def test_onnx_export_with_dynamic_batch_height_and_width(tmp_path, name, stride):
    """The dynamo ONNX exporter (torch.export underneath) gives one graph that onnxruntime runs at the traced
    size and at another one, at another batch size, equal to PyTorch's outputs."""
    torch.manual_seed(0)
    # (one block, in the first stage: the test is about the export, not the depth; the stem and every downsampling
    # S4ND layer stay)
    small = dict(depths=(1, 0, 0, 0)) if name.startswith('convnext') else dict(depth=1)
    model = timm.create_model(name, img_size=64, **small).eval()
    assert model_stride(model) == stride
    path = export_onnx(model, str(tmp_path / 'model.onnx'), img_size=(4 * stride, 4 * stride), max_side=1024)
    rows = onnx_latency(model, path, [(4 * stride, 4 * stride), (3 * stride, 5 * stride)], batch_size=3, repeats=1)
    assert [r['size'] for r in rows] == [f'{4 * stride}x{4 * stride}', f'{3 * stride}x{5 * stride}']
    assert all(r['max_abs_diff'] < 1e-4 for r in rows), rows
    for repeats in (0, 1.5):  # (a median of no runs failed after the whole comparison, naming no argument)
        with pytest.raises(ValueError, match=r'repeats must be an integer >= 1'):
            onnx_latency(model, path, [(4 * stride, 4 * stride)], repeats=repeats)
    with pytest.raises(ValueError, match='multiples of the model stride'):
        export_onnx(model, str(tmp_path / 'bad.onnx'), img_size=(4 * stride + 1, 4 * stride))
    # onnxruntime does not enforce the declared sides: the graph checks them (ViT-S4ND answered for a crop)
    with pytest.raises(Exception, match=f'input_sides_must_be_multiples_of_{stride}'):
        _onnxruntime(path, torch.randn(1, 3, 4 * stride + 8, 4 * stride))
    import onnx
    names = {value.name for value in onnx.load(path).graph.initializer}  # (the weights keep the model's names)
    assert 'head.fc.weight' in names and not any(name.startswith('model.') for name in names)


def _onnxruntime(path: str, x: torch.Tensor) -> torch.Tensor:
    """The ONNX file at `path` run on `x` by onnxruntime (CPU)."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize('pad', [False, True], ids=['refused', 'padded'])
def test_onnx_vit_fails_or_pads_at_sides_that_are_not_multiples_of_the_patch(tmp_path, pad):
    """A ViT-S4ND graph at 72 px (not a multiple of 16) answered for the top-left 64x64 crop, since onnxruntime does
    not enforce the declared sides: now it fails there (dynamic_img_pad=False: eager refuses 72 px too) or pads as
    eager does (dynamic_img_pad=True); at 64 and 80 px both equal eager."""
    torch.manual_seed(0)
    model = timm.create_model('vit_s4nd_atto_patch16_224', img_size=64, num_classes=10, dynamic_img_pad=pad,
                              depth=1).eval()
    path = export_onnx(model, str(tmp_path / 'vit.onnx'), img_size=(64, 64))
    for size in ((64, 64), (72, 72), (80, 80), (72, 96)):
        x = torch.randn(2, 3, *size)
        if pad or size[0] % 16 == 0:
            with torch.no_grad():
                torch.testing.assert_close(_onnxruntime(path, x), model(x), rtol=1e-4, atol=1e-5)
        else:
            with pytest.raises(Exception, match='input_sides_must_be_multiples_of_16'):
                _onnxruntime(path, x)


def test_export_command_writes_checks_and_times_the_file(tmp_path, capsys):
    """`s4nd-vision export` (= tools/export.py): model kwargs read as YAML, one JSON row per checked size."""
    import json

    from s4nd_vision.cli import main, tool_main
    path = tmp_path / 'vit.onnx'
    rows = tool_main('export', ['vit_s4nd_atto_patch16_224', '--output', str(path), '--model-kwargs', 'img_size=64',
                                'num_classes=5', 'bandlimit=0.5', 'depth=1', '--trace-size', '64', '--sizes', '64',
                                '48x80', '16x32'])
    out = capsys.readouterr().out.splitlines()
    assert path.is_file() and out[0].startswith(f'wrote {path} in ')
    assert [json.loads(line) for line in out[1:]] == rows and [r['size'] for r in rows] == ['64x64', '48x80', '16x32']
    import onnx
    graph = onnx.load(str(path)).graph
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5  # num_classes=5 reached the model
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta['num_classes'] == '5' and json.loads(meta['data_config'])['input_size'] == [3, 64, 64]
    assert all(r['max_abs_diff'] < 1e-4 for r in rows), rows
    with pytest.raises(SystemExit) as exit_info:
        main(['export', 'vit_s4nd_atto_patch16_224', '--model-kwargs', 'img_size'])
    assert exit_info.value.code == 2
    assert "argument --model-kwargs: model option 'img_size' must look like key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # before minutes of export, not in onnxruntime after them
        main(['export', 'vit_s4nd_atto_patch16_224', '--batch-size', '0'])
    assert exit_info.value.code == 2
    assert "argument --batch-size: expects a positive integer, got '0'" in capsys.readouterr().err


def test_export_onnx_defaults_to_the_models_channels_and_size(tmp_path):
    """Without img_size and in_chans, export_onnx and onnx_latency take the model's own input: a 1-channel model
    exports without arguments (the defaults were 3 channels at 224x224, whatever the model)."""
    import onnx
    torch.manual_seed(0)
    model = timm.create_model('s4nd_iso_tiny', img_size=14, in_chans=1, num_classes=10, depth=1).eval()
    path = export_onnx(model, str(tmp_path / 'iso.onnx'))
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 1
    (row,) = onnx_latency(model, path, [(14, 14)], batch_size=2, repeats=1)
    assert row['max_abs_diff'] < 1e-4, row
    with torch.no_grad():  # eager now exceeds the file by 1 in every logit: the check that every export relies on
        model.get_classifier().bias.add_(1.0)
    (row,) = onnx_latency(model, path, [(14, 14)], batch_size=2, repeats=1)
    assert row['max_abs_diff'] == pytest.approx(1.0, abs=1e-4), row


def test_an_interrupted_onnx_save_leaves_the_file_before_it(tmp_path, monkeypatch):
    """A save interrupted mid-write (Ctrl-C, a full disk) leaves the file written before, not a truncated one under
    its name, and no temporary file (the graph was written straight to the path); a save that completes replaces
    it. (The exporter is stubbed: only the save is tested.)"""
    class Program:  # what export_onnx uses of torch.onnx.export's ONNXProgram (a fixed-size graph)
        model = types.SimpleNamespace(metadata_props={})

        def save(self, destination, interrupt=True):
            with open(destination, 'wb') as f:
                f.write(b'new graph, half written' if interrupt else b'new graph')
            if interrupt:
                raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, 'export', lambda *args, **kwargs: Program())
    model = timm.create_model('s4nd_iso_tiny', img_size=14, in_chans=1, num_classes=10, depth=1).eval()
    path = tmp_path / 'iso.onnx'
    path.write_bytes(b'old graph')
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, str(path), fixed_size=True)
    assert path.read_bytes() == b'old graph' and os.listdir(tmp_path) == ['iso.onnx']
    monkeypatch.setattr(Program, 'save', functools.partialmethod(Program.save, interrupt=False))
    export_onnx(model, str(path), fixed_size=True)
    assert path.read_bytes() == b'new graph' and os.listdir(tmp_path) == ['iso.onnx']


def test_export_onnx_to_a_folder_is_refused_before_the_export(tmp_path, monkeypatch):
    """A path that is a folder failed only at the final rename, after the export (minutes for large models), with
    an IsADirectoryError naming a temporary file: export_onnx refuses it first (the command refuses it itself)."""
    monkeypatch.setattr(torch.onnx, 'export', lambda *a, **k: pytest.fail('exported before refusing the path'))
    model = timm.create_model('s4nd_iso_tiny', img_size=8, depth=1, dim=8, d_state=4, num_classes=3)
    with pytest.raises(ValueError, match='is a folder; name the ONNX file'):
        export_onnx(model, str(tmp_path), img_size=(8, 8))
    assert os.listdir(tmp_path) == []


def test_export_onnx_of_a_model_not_in_float32_is_refused_before_the_export(tmp_path, monkeypatch):
    """A model.half() or bfloat16 model failed minutes into the export with torch's ONNX ConversionError ('expected
    scalar type torch.float32 but found torch.float16'); a float64 model exported a graph that onnxruntime does not
    load (no float64 Conv or AveragePool: NOT_IMPLEMENTED): refused first, saying what to export instead."""
    monkeypatch.setattr(torch.onnx, 'export', lambda *a, **k: pytest.fail('exported before refusing the model'))
    model = timm.create_model('s4nd_iso_tiny', img_size=8, depth=1, dim=8, d_state=4, num_classes=3)
    for dtype in ('float16', 'bfloat16', 'float64'):
        with pytest.raises(ValueError, match=rf'model: its weights are torch.{dtype}; export_onnx exports float32 '
                                             r'models \(a float64 graph does not run in onnxruntime\): export '
                                             r'model.float\(\)'):
            export_onnx(model.to(getattr(torch, dtype)), str(tmp_path / 'half.onnx'), img_size=(8, 8))
    assert os.listdir(tmp_path) == []


def test_export_onnx_refuses_an_img_size_of_another_number_of_sides(tmp_path, monkeypatch):
    """A graph of dynamic sizes traced at img_size=(96,) or (96, 96, 96) (or 96) failed inside torch.export ('Failed
    to export the model with torch.export', no word of img_size): refused first, naming the sides the model takes."""
    monkeypatch.setattr(torch.onnx, 'export', lambda *a, **k: pytest.fail('exported before refusing img_size'))
    with torch.device('meta'):
        model = timm.create_model('convnext_s4nd_atto', img_size=64)
    for size, got in (((96,), r'\(96,\)'), ((96, 96, 96), r'\(96, 96, 96\)'), (96, r'\(96,\)')):
        with pytest.raises(ValueError, match=rf'img_size: \w+ takes inputs of 2 sides \(its input_size has '
                                             rf'\(64, 64\)\), got {got}$'):
            export_onnx(model, str(tmp_path / 'bad.onnx'), img_size=size)
    assert os.listdir(tmp_path) == []


def test_export_traces_a_small_model_at_3_strides_and_checks_it_down_to_1_stride(tmp_path, capsys):
    """convnext_s4nd_atto built at 64 px (2 strides) exports without --trace-size: traced at 3 strides, 96 px (it
    failed on a --trace-size never given), and the graph equals eager at its own 64 px and at 32 px; a default
    trace size the graph refuses is named as such."""
    import json

    from s4nd_vision.cli import main, tool_main
    from s4nd_vision.deploy.export import trace_size
    torch.manual_seed(0)
    path = tmp_path / 'small.onnx'
    rows = tool_main('export', ['convnext_s4nd_atto', '--model-kwargs', 'img_size=64', 'num_classes=5',
                                'depths=(1,0,0,0)',  # (a tuple, as timm's --model-kwargs reads it; stem,
                                # one block and every downsampling S4ND layer)
                                '--sizes', '64', '32', '32x96', '--output', str(path)])
    captured = capsys.readouterr()
    assert "traced at 96x96 (the model's 64x64 raised to 3 strides)" in captured.err
    assert [json.loads(line) for line in captured.out.splitlines()[1:]] == rows
    assert [r['size'] for r in rows] == ['64x64', '32x32', '32x96'] and all(r['max_abs_diff'] < 1e-4 for r in rows)
    import onnx
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}  # (preprocessing: the model's size)
    assert json.loads(metadata['data_config'])['input_size'] == [3, 64, 64], metadata  # (not the traced 96 px)
    with torch.device('meta'):
        model = timm.create_model('convnext_s4nd_atto', img_size=64)
    assert trace_size(model) == (96, 96) and trace_size(model, fixed_size=True) == (64, 64)
    # (a 1-block model of 8 channels: the refusals come from the stride and the sizes, not the depth or the width)
    small = ['depths=(1,0,0,0)', 'dims=(8,8,8,8)']
    for argv, message in (
            (['--model-kwargs', 'img_size=112', *small], "error: the default trace size (the model's input size): "
                                                        '112x112: sides must be multiples of the model stride 32 from '
                                                        '96 to 2048'),
            (['--model-kwargs', *small, '--trace-size', '64'], 'error: argument --trace-size: 64x64: sides must be '
                                                              'multiples of the model stride 32 from 96 to 2048'),
            (['--model-kwargs', *small, '--sizes', '48'], 'error: argument --sizes: 48x48: sides must be multiples of '
                                                         'the model stride 32 from 32 to 2048'),
            (['--model-kwargs', *small, '--sizes', '2080x32'], 'error: argument --sizes: 2080x32: sides must be '
                                                              'multiples of the model stride 32 from 32 to 2048'),
            (['--model-kwargs', *small, '--max-side', '128', '--trace-size', '96', '--sizes', '160x32'],
             'error: argument --sizes: 160x32: sides must be multiples of the model stride 32 from 32 to 128'),
            (['--model-kwargs', *small, '--max-side', '64'],
             'error: argument --max-side: at least 3 strides of convnext_s4nd_atto (96 px), got 64'),
            (['--model-kwargs', *small, '--fixed-size', '--max-side', '512'],
             'error: argument --max-side: a graph of --fixed-size takes its --trace-size only')):
        with pytest.raises(SystemExit) as exit_info:
            main(['export', 'convnext_s4nd_atto', *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_export_max_side_reaches_the_graph(monkeypatch, capsys):
    """`--max-side` raises the sides the graph declares (and the checks of --sizes) above 2048."""
    from s4nd_vision.cli import main
    from s4nd_vision.deploy import export
    calls = []

    def exported(model, path, **kwargs):  # (the export itself is tested above)
        calls.append(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, 'export_onnx', exported)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(['export', 'convnext_s4nd_atto', '--model-kwargs', 'img_size=64', 'depths=(1,1,1,1)', 'dims=(4,4,4,4)',
              '--max-side', '4096', '--sizes', '2080x32'])
    assert len(calls) == 1 and calls[0]['max_side'] == 4096 and not calls[0]['fixed_size'], calls


@pytest.mark.parametrize('name, kwargs, sides', [
    ('convnext_s4nd_atto', dict(depths=(1, 0, 0, 0)), ('32*h', '32*w')),  # multiples of the stride (32)
    ('vit_s4nd_atto_patch16_224', dict(depth=1, dynamic_img_pad=True), ('h', 'w')),  # padded in the graph
])
@pytest.mark.parametrize('max_side', [128, 4096])
def test_export_declares_the_batch_and_each_side_dynamic_up_to_max_side(name, kwargs, sides, max_side, tmp_path,
                                                                           monkeypatch):
    """The shapes export_onnx declares to torch.export: the batch, and height and width as two dims of their own
    (one dim for both would tie the width to the height), each from 3 strides to `max_side` (above 2048 too: a
    graph of larger sides would not be exported). Checked on the declaration, without the export (a minute)."""
    declared = []

    def exporter(model, args, **kw):
        declared.append(kw['dynamic_shapes'][0])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, 'export', exporter)
    model = timm.create_model(name, img_size=64, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, str(tmp_path / 'model.onnx'), img_size=(96, 128), max_side=max_side)
    shapes = declared[0]
    assert sorted(shapes) == [0, 2, 3] and shapes[0].__name__ == 'batch' and shapes[0].max >= 4096
    assert [(shapes[axis].__name__, shapes[axis].min, shapes[axis].max) for axis in (2, 3)] == [
        (side, 3 * model_stride(model), max_side) for side in sides]


def test_export_metadata_states_the_size_the_checkpoint_was_trained_at(tmp_path):
    """Weights trained at 96 px, loaded as `s4nd-vision export --checkpoint` loads them (no img_size given): the
    model, hence the file's data_config, stated the default 224 px (while its kernels keep the 96 px grids), so a
    deployment preprocessing from the metadata resized to 224 px."""
    from safetensors.torch import save_file

    from s4nd_vision.eval.resolution import load_model
    path = str(tmp_path / 'w96.safetensors')
    save_file(timm.create_model('convnext_s4nd_atto', img_size=96, num_classes=10).state_dict(), path)
    model = load_model('convnext_s4nd_atto', path)
    assert model.reference_img_size() == (96, 96)
    assert json.loads(onnx_metadata(model)['data_config'])['input_size'] == [3, 96, 96]


def test_onnx_metadata_fits_the_models_input_channels():
    """A single-channel model's file says so, with one mean and std (its pretrained cfg states the 3-channel source
    weights', as timm's do): preprocessing by the metadata feeds the graph what it takes."""
    import json
    for name in ('convnext_s4nd_atto', 's4nd_iso_tiny'):
        model = timm.create_model(name, in_chans=1, img_size=64)
        config = json.loads(onnx_metadata(model)['data_config'])
        assert config['input_size'] == [1, 64, 64] and len(config['mean']) == len(config['std']) == 1, name
        assert json.loads(onnx_metadata(model, (1, 32, 48))['data_config'])['input_size'] == [1, 32, 48]


def test_sgconv_exports_one_graph_for_every_length_and_s4_is_refused(tmp_path):
    """SGConv's interpolation matrix is built from the symbolic length and rate (it was specialized to the traced
    ones); the DPLR S4 kernel's repeated squaring cannot follow a symbolic length: refused in one line."""
    torch.manual_seed(0)
    seq = timm.create_model('s4nd_seq_atto', kernel='sgconv', seq_len=64).eval()
    program = torch.export.export(seq, (torch.randn(2, 1, 64),),
                                  dynamic_shapes=({2: torch.export.Dim('length', min=8, max=512)},))
    x = torch.randn(2, 1, 100)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), seq(x), rtol=1e-4, atol=1e-5)
    s4 = timm.create_model('convnext_s4nd_atto', kernel='s4', bandlimit=0, img_size=64).eval()
    with pytest.raises(ValueError, match=r'model: the S4 \(DPLR\) kernel cannot be exported to ONNX'):
        export_onnx(s4, str(tmp_path / 's4.onnx'), img_size=(96, 96))
    # a sequence or video model: the reason in one line, before a trace fails on a 4-D input
    for name, size in (('s4nd_seq_atto', '(784,)'), ('convnext_s4nd_3d_atto', '(16, 224, 224)')):
        with torch.device('meta'):
            model = timm.create_model(name)
        with pytest.raises(ValueError, match=rf'does not take images \(its input_size has the sides '
                                             rf'{re.escape(size)}\): graphs of dynamic sizes take image models, '
                                             r'.* at a fixed size'):
            export_onnx(model, str(tmp_path / 'other.onnx'), img_size=(96, 96))
    # a ViT of one input size (timm's dynamic_img_size=False): a graph of dynamic sides would take other sizes
    with torch.device('meta'):
        fixed = timm.create_model('vit_s4nd_atto_patch16_224', img_size=64, dynamic_img_size=False)
    with pytest.raises(ValueError, match=r'built with dynamic_img_size=False \(it takes \(64, 64\) only\)'):
        export_onnx(fixed, str(tmp_path / 'fixed.onnx'), img_size=(64, 64))


@pytest.mark.parametrize('kwargs', [dict(l_ref=8, l_max=4), dict(l_ref=None, l_max=5), dict(kernel='sgconv', l_max=4)],
                         ids=['l_ref', 'no_l_ref', 'sgconv'])
def test_layer_with_l_max_exports_one_graph_for_every_size(kwargs):
    """A layer's l_max caps its kernels at min(side, l_max / rate): the graph exported with dynamic sides held a guard
    that was true at the traced side only (export refused the declared range)."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=8, **kwargs).eval()
    dims = {2: torch.export.Dim('h', min=3, max=64), 3: torch.export.Dim('w', min=3, max=64)}
    program = torch.export.export(layer, (torch.randn(2, 4, 12, 12),), dynamic_shapes=(dims,))
    for size in ((12, 12), (9, 20), (30, 7), (3, 5)):
        x = torch.randn(2, 4, *size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-4, atol=1e-5)


def test_torch_export_program_of_dynamic_sizes_saves_and_loads(tmp_path):
    """A torch.export program with dynamic sides saves with torch.export.save and, loaded back, equals eager at
    other sizes: the layers' `torch.autocast(enabled=False)` around the kernel generation (also outside autocast)
    captured a `wrap_with_autocast` subgraph whose symbolic float input (the kernel rate) save refused."""
    torch.manual_seed(0)
    model = timm.create_model('vit_s4nd_atto_patch16_224', depth=1, num_classes=4).eval()
    dims = {0: torch.export.Dim('batch', max=64), 2: 16 * torch.export.Dim('h', min=3, max=8),
            3: 16 * torch.export.Dim('w', min=3, max=8)}
    program = torch.export.export(model, (torch.randn(2, 3, 48, 48),), dynamic_shapes=(dims,))
    torch.export.save(program, str(tmp_path / 'model.pt2'))
    loaded = torch.export.load(str(tmp_path / 'model.pt2')).module()
    for size in ((48, 48), (64, 96)):
        x = torch.randn(3, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
@pytest.mark.parametrize('name', ['convnext_s4nd_atto', 'convnext_sgconv_atto', 's4'])
def test_jit_trace_passes_its_check_and_computes_kernels_from_the_weights(name, grad):
    """`torch.jit.trace` (with its check that two invocations trace the same graph) works with and without autograd,
    and the traced graph generates the kernels from the parameters: with other weights copied in, it gives the other
    model's output (inference's kernel cache, baked into a trace, would keep the old kernels)."""
    torch.manual_seed(0)
    args = dict(model_name='convnext_s4nd_atto', kernel='s4', bandlimit=0) if name == 's4' else dict(model_name=name)
    # (the stem, one block and every downsampling: every kind of S4ND layer, a small graph to trace)
    args['depths'] = (1, 0, 0, 0)
    model, other = (timm.create_model(**args).eval() for _ in range(2))
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(other(x), model(x), rtol=1e-3, atol=1e-3)  # (sanity: the weights matter)
        for t, o in zip([*traced.parameters(), *traced.buffers()], [*other.parameters(), *other.buffers()]):
            t.copy_(o)
        torch.testing.assert_close(traced(x), other(x), rtol=1e-4, atol=1e-5)


def test_jit_trace_warns_that_the_traced_module_takes_the_traced_size_only():
    """A trace records each S4ND layer's kernel lengths and rates as constants: at another size the traced module
    runs without error and gives wrong results, so the trace says so (beyond PyTorch's generic TracerWarnings)."""
    torch.manual_seed(0)
    layer = S4ND(4, ndim=2, d_state=8).eval()
    with pytest.warns(torch.jit.TracerWarning, match='S4ND layers at the traced input size.*wrong results'):
        traced = torch.jit.trace(layer, torch.randn(2, 4, 8, 8))
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(traced(x), layer(x), atol=1e-3)  # (what the warning is about)


def test_export_command_passes_the_models_input_channels(monkeypatch, tmp_path, capsys):
    """`--model-kwargs in_chans=1`: the export and the timing runs feed 1-channel inputs (the model's own)."""
    import s4nd_vision.deploy.export as export
    from s4nd_vision.cli import main
    seen = {}
    monkeypatch.setattr(export, 'export_onnx', lambda model, path, **kw: seen.setdefault('export', kw))
    monkeypatch.setattr(export, 'onnx_latency', lambda model, path, sizes, **kw: seen.setdefault('latency', kw) and [])
    main(['export', 'convnext_s4nd_atto', '--model-kwargs', 'in_chans=1', '--trace-size', '96', '--sizes', '128',
          '--output', str(tmp_path / 'm.onnx')])
    assert seen['export']['in_chans'] == 1 and seen['latency']['in_chans'] == 1


def test_reference_generation_stacks_kernels_of_one_length_and_equals_the_fast_kernels():
    """In a captured graph the S4D kernels sharing d_state, num_kernels, length and rate come from one reference
    call (mixed band limits included): equal to the fast generation, values and gradients, in a graph that grows
    with the number of groups, not of kernels."""
    torch.manual_seed(0)
    kernels = [SSMKernel(dim, d_state=8, num_kernels=2, dt_min=0.05, dt_max=0.5, bandlimit=cut).double()
               for dim, cut in ((3, None), (4, 0.5), (2, None), (5, 0.5))]
    kernels.append(SSMKernel(3, d_state=4, num_kernels=2).double())
    # groups: the first two; the third (its rate); the fourth (its length); the fifth (its d_state)
    lengths, rates = [9, 9, 9, 12, 9], [1.0, 1.0, 0.5, 1.0, 1.0]
    fast = ssm_kernels(kernels, lengths, rates, torch.float64)
    sines = []

    def backend(gm, example_inputs):
        sines.append(sum(n.target in (torch.sin, 'sin') for n in gm.graph.nodes))
        return gm.forward

    for group in (kernels[:1], kernels):
        torch._dynamo.reset()
        n = len(group)
        made = torch.compile(lambda: ssm_kernels(group, lengths[:n], rates[:n], torch.float64),
                             backend=backend, fullgraph=True)()
        for got, want in zip(made, fast):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [p for k in kernels for p in _params(k)]
    weights = [torch.randn_like(k) for k in fast]
    grads = [torch.autograd.grad(sum((k * w).sum() for k, w in zip(ks, weights)), params)
             for ks in (fast, made)]
    for g_ref, g_fast in zip(*grads):
        torch.testing.assert_close(g_ref, g_fast, rtol=1e-9, atol=1e-11)
    assert sines[0] > 0 and sines[1] == 4 * sines[0]


def _ops_after_onnxruntime_loads(path: str, tmp_path) -> collections.Counter:
    """Operator counts of the ONNX file at `path` as onnxruntime runs it (its basic, portable optimizations:
    constant folding among them)."""
    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / 'loaded.onnx')
    ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_fixed_size_onnx_has_its_s4nd_kernels_folded_into_constants(tmp_path, capsys):
    """A graph of one fixed size (the batch dynamic) computes S4ND's kernels from the weights alone: once onnxruntime
    has loaded it, no kernel generation (Sin, Cos, Exp) is left to run per call. Outputs equal PyTorch's at batches
    1 and 3; a ViT built for one size exports this way; the S4 (DPLR) kernel, complex arithmetic, still does not;
    the command refuses to check such a file at another size, before exporting."""
    from s4nd_vision.cli import main
    torch.manual_seed(0)
    generation = ('Sin', 'Cos', 'Exp')
    # (the stem, a block and every downsampling: the depth is moot)
    model = timm.create_model('convnext_s4nd_atto', depths=(1, 0, 0, 0)).eval()
    path = export_onnx(model, str(tmp_path / 'fixed.onnx'), img_size=(64, 96), fixed_size=True)
    import json

    import onnx
    assert sum(n.op_type in generation for n in onnx.load(path).graph.node) > 10  # (generated in the file...)
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}  # (what preprocessing needs, the graph's size)
    assert meta['architecture'] == 'convnext_s4nd_atto' and meta['num_classes'] == '1000'
    config = json.loads(meta['data_config'])
    assert config['input_size'] == [3, 64, 96] and config['interpolation'] == 'bicubic'
    assert config['mean'] == list(model.pretrained_cfg['mean']) and config['std'] == list(model.pretrained_cfg['std'])
    assert sum(_ops_after_onnxruntime_loads(path, tmp_path)[op] for op in generation) == 0  # (...folded on load)
    for batch in (1, 3):
        (row,) = onnx_latency(model, path, [(64, 96)], batch_size=batch, repeats=1)
        assert row['max_abs_diff'] < 1e-4, row
    vit = timm.create_model('vit_s4nd_atto_patch16_224', img_size=64, dynamic_img_size=False, depth=1).eval()
    path = export_onnx(vit, str(tmp_path / 'vit.onnx'), img_size=(64, 64), fixed_size=True)
    (row,) = onnx_latency(vit, path, [(64, 64)], batch_size=2, repeats=1)
    assert row['max_abs_diff'] < 1e-4, row
    with torch.device('meta'):
        s4 = timm.create_model('convnext_s4nd_atto', kernel='s4', bandlimit=0)
    with pytest.raises(ValueError, match=r'the S4 \(DPLR\) kernel cannot be exported to ONNX \(its generation is '
                                         r'complex arithmetic'):
        export_onnx(s4, str(tmp_path / 's4.onnx'), img_size=(64, 64), fixed_size=True)
    with pytest.raises(SystemExit) as exit_info:
        main(['export', 'convnext_s4nd_atto', '--model-kwargs', 'depths=(1,0,0,0)', '--fixed-size', '--trace-size',
              '64', '--sizes', '64', '96'])
    assert exit_info.value.code == 2
    assert ('argument --sizes: 96x96: the graph of --fixed-size takes its --trace-size only (64x64)'
            in capsys.readouterr().err)


def test_fixed_size_onnx_exports_clips_and_sequences(tmp_path, capsys):
    """Video and sequence models (no graph of dynamic sizes) export at a fixed size, through the command too
    (sizes TxHxW, or L), equal to PyTorch; a size of the wrong number of sides is refused in one line."""
    import json

    from s4nd_vision.cli import main, tool_main
    torch.manual_seed(0)
    video = timm.create_model('convnext_s4nd_3d_atto', depths=(1, 0, 0, 0)).eval()  # (the export, not the depth)
    path = export_onnx(video, str(tmp_path / 'video.onnx'), img_size=(4, 32, 32), fixed_size=True)
    (row,) = onnx_latency(video, path, [(4, 32, 32)], batch_size=2, repeats=1)
    assert row['size'] == '4x32x32' and row['max_abs_diff'] < 1e-4, row
    with pytest.raises(ValueError, match=r'img_size: ConvNeXt3d takes inputs of 3 sides \(its input_size has '
                                         r'\(16, 224, 224\)\), got \(32, 32\)'):
        export_onnx(video, str(tmp_path / 'bad.onnx'), img_size=(32, 32), fixed_size=True)
    path = tmp_path / 'seq.onnx'
    rows = tool_main('export', ['s4nd_seq_atto', '--model-kwargs', 'depth=1', '--fixed-size', '--trace-size', '100',
                                '--sizes', '100', '--output', str(path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f'wrote {path} in ') and out[0].endswith('(dynamic batch, input size fixed)')
    assert [json.loads(line) for line in out[1:]] == rows and [r['size'] for r in rows] == ['100']
    assert rows[0]['max_abs_diff'] < 1e-4, rows
    with pytest.raises(SystemExit) as exit_info:
        main(['export', 'convnext_s4nd_3d_atto', '--model-kwargs', 'depths=(1,0,0,0)', '--fixed-size', '--trace-size',
              '32x32'])
    assert exit_info.value.code == 2
    assert 'argument --trace-size: 32x32: the model takes inputs of 3 sides, got 2' in capsys.readouterr().err


def test_export_without_the_export_extra_says_how_to_install_it(monkeypatch, capsys):
    """A plain install (no onnx/onnxscript/onnxruntime): one error line naming the extra, not the exporter's
    ModuleNotFoundError traceback."""
    import importlib.util

    from s4nd_vision.cli import main
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *rest: None if name == 'onnxscript' else find_spec(name, *rest))
    with pytest.raises(SystemExit) as exit_info:
        main(['export', 'convnext_s4nd_atto', '--model-kwargs', 'depths=(1,1,1,1)'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'Traceback' not in err
    assert 'export needs the onnxscript package of the export extra: pip install "s4nd-vision[export]"' in err
