"""Numeric paths: what `dtype=auto` picks and why, the fp32 score math under bf16 weights, and
the manifest's numeric path (a collection built in one dtype queried in another)."""

import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import ModelLoadError
from twostage.retrieval.models import numerics
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.numerics import choose_dtype, cpu, fused_int8, native_bf16
from twostage.retrieval.models.reranker import probe_scores
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.yes_no_reranker import YesNoReranker
from twostage.retrieval.store.collections import (
    embedder_mismatch,
    open_store,
    require_same_builder,
    version_for_ingest,
)
from twostage.retrieval.store.vector_store import StoreError

CPU = torch.device("cpu")
BF16_HERE = native_bf16() is not None


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, *features: str) -> None:
    """The hardware probe answers `features` alone: for the decision rules (which engine, which
    path), whatever this CPU is. Kernels that would fault without a feature never run under it."""
    monkeypatch.delenv(cpu.FEATURES_ENV, raising=False)
    monkeypatch.setattr(cpu, "detected_features", lambda: frozenset(features))


def tiny(tiny_models: TinyModelPaths, cache: Path, **extra: object) -> Settings:
    return Settings(
        embedder={"model": str(tiny_models.embedder)},
        reranker={"model": str(tiny_models.reranker)},
        cache_dir=cache,
        device="cpu",
        **extra,  # type: ignore[arg-type]
    )


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """x86 Linux: torch's cpuinfo probe agrees with the kernel's flags (avx512_bf16 or amx_bf16);
    `TWOSTAGE_CPU_FEATURES` narrows what the project sees to the features it names, never more."""
    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists():
        pytest.skip("the flags are checked against /proc/cpuinfo on x86-64 Linux")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    monkeypatch.delenv(cpu.FEATURES_ENV, raising=False)
    assert (native_bf16() is not None) == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert numerics.int8_full_range() == bool(cpu.VNNI_FEATURES & flags)
    monkeypatch.setenv(cpu.FEATURES_ENV, "avx2")
    assert (native_bf16(), numerics.int8_full_range(), cpu.amx_int8()) == (None, False, False)
    assert cpu.cpu_features() == cpu.detected_features() & {"avx2"}
    monkeypatch.setenv(cpu.FEATURES_ENV, "avx2, AVX512_VNNI,amx_bf16")  # what the CPU lacks stays off
    assert numerics.int8_full_range() == ("avx512_vnni" in flags)
    assert (native_bf16() == "amx_bf16") == ("amx_bf16" in cpu.detected_features())


def test_dtype_choice(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    auto = choose_dtype("auto", CPU)
    if BF16_HERE:  # picked, but only for models that measure within tolerance
        assert auto.dtype == torch.bfloat16 and auto.measured and "CPU with" in auto.why
    else:
        assert auto.dtype == torch.float32 and not auto.measured
    assert choose_dtype("float32", CPU) == numerics.DtypeChoice(
        torch.float32, False, "dtype float32 asked for"
    )
    with pytest.raises(ModelLoadError, match="unknown dtype 'int4'"):
        choose_dtype("int4", CPU)
    # a CPU without native bf16 (the hardware probe answers no): auto is fp32; an explicit bf16
    # falls back to fp32 with one log line, or is refused under numerics.strict
    monkeypatch.setenv(cpu.FEATURES_ENV, "avx2")
    assert choose_dtype("auto", CPU).dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="twostage.retrieval.models.numerics"):
        fallback = choose_dtype("bfloat16", CPU)
    assert fallback.dtype == torch.float32 and not fallback.measured
    assert [r.message for r in caplog.records] == [
        "dtype bfloat16 asked for on a CPU without native bf16 (no avx512_bf16, AMX or Arm bf16): "
        "running in float32, which is faster and exact here"
    ]
    with pytest.raises(ModelLoadError, match=r"without native bf16.*unset numerics.strict"):
        choose_dtype("bfloat16", CPU, strict=True)


@pytest.mark.skipif(not BF16_HERE, reason="dtype=auto measures bf16 only on a CPU with native bf16")
def test_auto_keeps_bf16_only_for_a_model_within_tolerance(
    tiny_models: TinyModelPaths, tmp_path: Path
) -> None:
    """The first load measures fp32 against bf16 on the probes and caches the verdict by content
    hash; within tolerance the model runs in bf16, beyond it in fp32."""
    loose = tiny(tiny_models, tmp_path / "loose", dtype="auto",
                 numerics={"embedder_min_cosine": 0.5, "reranker_max_delta": 0.5})  # fmt: skip
    embedder, reranker = load_embedder(loose), load_reranker(loose)
    assert (embedder.numerics, reranker.numerics) == ("bfloat16", "bfloat16")
    verdicts = sorted((tmp_path / "loose" / "numerics").glob("*.json"))
    assert len(verdicts) == 2
    measured = [json.loads(v.read_text())["deviation"] for v in verdicts]
    assert all(0 < m < 0.5 for m in measured), measured  # bf16 is not exact, and not far off
    assert load_embedder(loose).numerics == "bfloat16"  # from the cached verdict

    strict = tiny(tiny_models, tmp_path / "strict", dtype="auto",
                  numerics={"embedder_min_cosine": 1.0, "reranker_max_delta": 0.0})  # fmt: skip
    assert (load_embedder(strict).numerics, load_reranker(strict).numerics) == ("float32", "float32")
    exact = tiny(tiny_models, tmp_path / "exact", dtype="float32")
    np.testing.assert_array_equal(probe_scores(load_reranker(strict)), probe_scores(load_reranker(exact)))


@pytest.mark.parametrize("feature", ["amx_bf16", "avx512_bf16"])
def test_bf16_reranker_forms_its_score_in_fp32(
    tiny_models: TinyModelPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feature: str
) -> None:
    """bf16 on a CPU is bf16 matrix products in an fp32 model (`bf16_matmuls`): every Linear of the
    decoder has bf16 weights (with AMX attention and SwiGLU run in bf16 too), the norms and the
    score stay fp32, and the scores land nearer fp32 than the whole model in bf16 (CUDA's path). There W_yes - W_no is
    formed in fp32 from the bf16 rows, as a bf16 subtraction would round it."""
    if BF16_HERE:  # both CPU paths of `bf16_matmuls`, on whichever native bf16 this CPU has
        pretend_cpu(monkeypatch, feature)
    half = load_reranker(tiny(tiny_models, tmp_path, dtype="bfloat16", numerics={"strict": False}))
    full = load_reranker(tiny(tiny_models, tmp_path, dtype="float32"))
    if not BF16_HERE:
        assert half.numerics == "float32"  # fell back
        return
    assert isinstance(half, YesNoReranker) and isinstance(full, YesNoReranker) and half.numerics == "bfloat16"
    decoder = half.model.get_decoder()
    assert not any(isinstance(m, torch.nn.Linear) for m in decoder.modules())
    linears = [m for m in decoder.modules() if isinstance(m, numerics.Bf16Linear)]
    assert len(linears) == 7 * half.model.config.num_hidden_layers
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in decoder.parameters())  # embeddings, norms
    assert half._direction.dtype == torch.float32 and torch.equal(half._direction, full._direction)
    # each pre-norm is rounded to bf16 once for the Linear layers that read it: the same scores
    # as rounding it in each of them
    wrapped = [(layer, norm) for layer in decoder.layers for norm in numerics.PRE_NORMS]
    assert all(isinstance(getattr(layer, norm), numerics.Bf16Output) for layer, norm in wrapped)
    # with AMX, attention runs in bf16 (SDPA's boolean masks: documents of two queries in one packed
    # row, or batched over left-padded prefixes, score as they do alone), SwiGLU's gate and up
    # answer in bf16, and so do the values, which attention would round to bf16 anyway: the same
    # scores without that
    amx = feature == "amx_bf16"
    bf16_out = torch.bfloat16 if amx else torch.float32
    assert (half.model.config._attn_implementation == numerics.BF16_ATTENTION) == amx
    values = [layer.self_attn.v_proj for layer in decoder.layers]
    swiglu = [proj for layer in decoder.layers for proj in (layer.mlp.gate_proj, layer.mlp.up_proj)]
    assert all(proj.out_dtype == bf16_out for proj in values + swiglu)
    requests = [
        ("chess engine", ["a chess engine", "a text editor"], None),
        ("editor", ["vim", "a", "b"], None),
    ]
    for packed in (True, False):  # one packed row for both queries; padded: prefixes left-padded
        half.packed = packed
        alone = [half.score(q, docs) for q, docs, _ in requests]
        np.testing.assert_allclose(
            np.concatenate(half.score_many(requests)), np.concatenate(alone), atol=2e-3
        )
    once = probe_scores(half)
    for layer, norm in wrapped:
        setattr(layer, norm, getattr(layer, norm).module)
    for v in values:
        v.out_dtype = torch.float32
    assert np.array_equal(probe_scores(half), once)
    if amx:
        half.model.set_attn_implementation("sdpa")  # fp32 attention: not the same scores
        assert not np.array_equal(probe_scores(half), once)

    whole = YesNoReranker(
        AutoModelForCausalLM.from_pretrained(tiny_models.reranker, dtype=torch.bfloat16).eval(),
        AutoTokenizer.from_pretrained(tiny_models.reranker),
        model_id="whole-bf16",
        instruction=half.instruction,
    )
    weight = whole.model.get_output_embeddings().weight.detach()  # type: ignore[union-attr]
    assert weight.dtype == torch.bfloat16 and whole._direction.dtype == torch.float32
    assert torch.equal(whole._direction, weight[whole.yes_id].float() - weight[whole.no_id].float())
    rounded = (weight[whole.yes_id] - weight[whole.no_id]).float()  # what bf16 math would have used
    assert not torch.equal(whole._direction, rounded)

    reference = probe_scores(full)
    mixed, wholly = (np.abs(scores - reference).max() for scores in (once, probe_scores(whole)))
    assert 0 < mixed < wholly < 0.05, (mixed, wholly)


def test_a_collection_knows_the_numeric_path_that_built_it(
    tiny_models: TinyModelPaths, tmp_path: Path, model_cache: Path
) -> None:
    """Built in float32: the manifest records float32 and the probe vectors. The same model in
    bfloat16 may query it only when its probe vectors stay within numerics.embedder_min_cosine."""
    settings = tiny(tiny_models, model_cache, dtype="float32", data_dir=tmp_path / "data")
    built_by = load_embedder(settings)
    store = open_store(settings)
    try:
        manifest, _ = version_for_ingest(store, "docs", built_by, settings, new_version=False)
        assert manifest.embedder_numerics == "float32"
        assert manifest.embedder_fingerprint == built_by.fingerprint
        assert embedder_mismatch(manifest, built_by) is None
        other = load_embedder(tiny(tiny_models, model_cache, dtype="bfloat16"))
        if other.numerics == "float32":
            pytest.skip("no native bf16 here: the other numeric path fell back to float32")
        assert other.model_id == built_by.model_id  # the same files: only the numerics differ
        cosine = manifest.embedder_fingerprint.min_cosine(other.fingerprint)  # type: ignore[union-attr]
        assert 0.9 < cosine < 1.0
        assert embedder_mismatch(manifest, other, min_cosine=cosine - 1e-6) is None
        refused = embedder_mismatch(manifest, other, min_cosine=min(1.0, cosine + 1e-4))
        assert refused is not None and refused.startswith(
            f"collection docs__v1 was embedded in float32; this process runs {built_by.model_id} in bfloat16"
        )
        assert "TWOSTAGE_DTYPE=float32" in refused
        with pytest.raises(StoreError, match="was embedded in float32"):
            require_same_builder(manifest, other, settings.chunker, min_cosine=1.0)
    finally:
        store.close()


def test_int8_is_for_the_small_encoders(
    tiny_models: TinyModelPaths, minilm_settings: Settings, minilm_embedder: Embedder, tmp_path: Path
) -> None:
    """quantize=int8 on torch's kernels (`int8_engine=fbgemm`) runs MiniLM's Linear layers in dynamic
    int8 (its numeric path says so, its vectors stay near fp32's: SmoothQuant scales and bf16 down
    projections keep its probes within the default 0.999 cosine where activations keep 8 bits), so
    an index built in float32 accepts it at the default tolerance there (not on 7 bits, without
    VNNI) and refuses it at a stricter one, naming the setting that built it; a Qwen3 (last-token /
    yes-no) model asked for int8 is one clear error naming its family."""
    int8 = load_embedder(minilm_settings.model_copy(update={
        "embedder": minilm_settings.embedder.model_copy(update={"quantize": "int8"}),
        "numerics": minilm_settings.numerics.model_copy(update={"int8_engine": "fbgemm"})}))  # fmt: skip
    assert int8.numerics == "int8-dynamic" and minilm_embedder.numerics == "float32"
    bf16 = numerics.native_bf16() is not None
    layer = int8.model[0].auto_model.encoder.layer[0]  # type: ignore[attr-defined]
    assert isinstance(layer.attention.self.query, numerics.SmoothedLinear)
    assert layer.intermediate.dense.out_dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert type(layer.output.dense) is (numerics.Bf16Linear if bf16 else torch.nn.Linear)
    texts = ["apt installs packages", "a chess engine for the terminal", "数据 ünïcödé"]
    a, b = int8.embed_documents(texts), minilm_embedder.embed_documents(texts)
    assert np.all((a * b).sum(1) > 0.9)  # unit vectors: cosine
    accepted, refused, rebuild = _int8_against_an_fp32_index(minilm_settings, minilm_embedder, int8, tmp_path)
    # 8-bit activations (VNNI, AMX-INT8) keep MiniLM's probes within the default 0.999 cosine, so an
    # fp32-built index accepts them; fbgemm's 7-bit activations elsewhere do not (an AVX2-only EPYC)
    assert accepted == numerics.int8_full_range()
    assert f"runs {minilm_embedder.model_id} in int8-dynamic" in refused
    assert "TWOSTAGE_DTYPE=float32" in refused
    assert "TWOSTAGE_EMBEDDER__QUANTIZE=int8" in rebuild
    for role, quantized, family in (
        ("embedder", {"embedder": {"model": str(tiny_models.embedder), "quantize": "int8"}}, "last-token"),
        ("reranker", {"reranker": {"model": str(tiny_models.reranker), "quantize": "int8"}}, "yes-no"),
    ):
        settings = Settings(cache_dir=tmp_path / "cache", device="cpu", **quantized)  # type: ignore[arg-type]
        with pytest.raises(ModelLoadError, match=f"is a {family} {role}, which is not quantized here"):
            (load_embedder if role == "embedder" else load_reranker)(settings)


def test_fused_int8_embedder_keeps_the_layers_that_write_its_vectors_in_bf16(
    minilm_settings: Settings, minilm_embedder: Embedder, tmp_path: Path
) -> None:
    """int8_engine=onednn-fused: MiniLM in bf16 with oneDNN's int8 products for the query and key
    (one shared quantized input) and the intermediate layer (its GELU inside the product); the
    value, attention-output and down projections, whose rounding goes straight into the vectors,
    stay bf16, the pooler fp32. With 8-bit activations (VNNI) its probes stay within the default
    0.999 cosine of fp32's, so an fp32-built index accepts it (7-bit elsewhere: refused), and an
    index it built names the setting that rebuilds it."""
    fused = load_embedder(minilm_settings.model_copy(update={
        "embedder": minilm_settings.embedder.model_copy(update={"quantize": "int8"}),
        "numerics": minilm_settings.numerics.model_copy(update={"int8_engine": "onednn-fused"})}))  # fmt: skip
    assert fused.numerics == "int8-fused"
    bert = fused.model[0].auto_model  # type: ignore[attr-defined]
    layer = bert.encoder.layer[0]
    attention = layer.attention.self
    assert isinstance(attention.query, fused_int8.FusedInt8Linear) and isinstance(
        attention.key, fused_int8.FusedInt8Linear
    )
    assert attention.query.shared is attention.key.shared is not None
    assert (
        isinstance(layer.intermediate.dense, fused_int8.FusedInt8Linear)
        and layer.intermediate.dense.post_op == "gelu"
    )
    assert type(layer.intermediate.intermediate_act_fn) is torch.nn.Identity
    for bf16 in (attention.value, layer.attention.output.dense, layer.output.dense):
        assert type(bf16) is torch.nn.Linear and bf16.weight.dtype == torch.bfloat16
    assert bert.pooler is None or isinstance(bert.pooler, fused_int8.Fp32Input)
    texts = ["apt installs packages", "a chess engine for the terminal", "数据 ünïcödé"]
    a, b = fused.embed_documents(texts), minilm_embedder.embed_documents(texts)
    assert np.all((a * b).sum(1) > 0.99)
    accepted, _, rebuild = _int8_against_an_fp32_index(minilm_settings, minilm_embedder, fused, tmp_path)
    # probes within the default 0.999 (measured 0.99934) on 8-bit activations; not on 7 (no VNNI)
    assert accepted == numerics.int8_full_range()
    assert "TWOSTAGE_NUMERICS__INT8_ENGINE=onednn-fused" in rebuild


def _int8_against_an_fp32_index(
    settings: Settings, fp32: Embedder, int8: Embedder, tmp_path: Path
) -> tuple[bool, str, str]:
    """Whether an index built by `fp32` accepts `int8` at the default tolerance; why it refuses it at
    a stricter one; and why `fp32` is refused by an index `int8` built (the setting that rebuilds)."""
    settings = settings.model_copy(update={"data_dir": tmp_path / "data"})
    store = open_store(settings)
    try:
        manifest, _ = version_for_ingest(store, "docs", fp32, settings, new_version=False)
        refused = embedder_mismatch(manifest, int8, min_cosine=0.999999)
        int8_built = manifest.model_copy(
            update={"embedder_numerics": int8.numerics, "embedder_fingerprint": int8.fingerprint}
        )
        rebuild = embedder_mismatch(int8_built, fp32, min_cosine=0.999999)
        assert refused is not None and rebuild is not None
        return embedder_mismatch(manifest, int8) is None, refused, rebuild
    finally:
        store.close()


def test_fused_int8_linear_is_an_int8_product_of_its_layer() -> None:
    """A `FusedInt8Linear` answers its Linear's product within int8 rounding, with GELU applied
    inside when asked; layers reading the same tensor through one `SharedInput` quantize it once,
    which holds it only until the last of them has read it, and a new tensor is quantized anew. The quantizer keeps zero exact."""
    torch.manual_seed(0)
    x = torch.randn(200, 64)
    x[:, :3] *= 30.0  # outlier channels
    linears = [torch.nn.Linear(64, 96) for _ in range(3)]
    maxima = x.abs().amax(0)
    shared = fused_int8.SharedInput(readers=3)
    scale = fused_int8.smoothing_scale(torch.cat([m.weight for m in linears]), maxima)
    layers = [
        fused_int8.FusedInt8Linear(m, maxima, torch.float32, smoothing=scale, shared=shared) for m in linears
    ]
    calls = []
    for layer in layers:
        quantize = layer.quantize
        layer.quantize = lambda rows, inverse, q=quantize: calls.append(rows.shape) or q(rows, inverse)  # type: ignore[method-assign]
    activations = x.bfloat16()  # what a bf16 encoder hands them
    with torch.no_grad():
        for layer, linear in zip(layers, linears, strict=True):
            expected = linear(x)
            error = float((layer(activations) - expected).abs().mean() / expected.abs().mean())
            assert 0 < error < 0.03, error
        assert len(calls) == 1 and shared._last is None  # quantized once for all three, then let go
        layers[0](x.bfloat16()), layers[1](x.bfloat16())
        assert len(calls) == 3  # each new tensor once
        gelu = fused_int8.FusedInt8Linear(linears[0], maxima, torch.float32, gelu=True)
        expected = torch.nn.functional.gelu(linears[0](x))
        assert float((gelu(x) - expected).abs().mean() / expected.abs().mean()) < 0.03
    quantized, step, zero_point = fused_int8.quantize_rows(torch.tensor([[-1.0, 0.0, 3.0]]), torch.ones(3))
    assert quantized.dtype == torch.uint8 and int(quantized[0, 1]) == int(zero_point)
    assert torch.allclose(
        (quantized.float() - zero_point) * step, torch.tensor([[-1.0, 0.0, 3.0]]), atol=float(step)
    )


def test_int8_auto_picks_the_fused_path_where_the_cpu_has_amx_int8(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`int8_engine=auto`: the fused path on a CPU with AMX-INT8, for both roles; where
    `torch.compile` cannot build its kernel, one warning and oneDNN's eager kernels for a packing
    reranker, torch's default for the rest; an explicit onednn-fused then fails to load, saying why.
    Without AMX-INT8, torch's default."""
    pretend_cpu(monkeypatch, "avx512_vnni", "amx_int8")
    assert numerics.auto_int8_engine(packed=True) == numerics.auto_int8_engine(packed=False) == "onednn-fused"

    def no_compiler() -> None:
        raise fused_int8.FusedInt8Unavailable(
            "torch.compile could not build the int8 quantizing kernel: no g++"
        )

    monkeypatch.setattr(fused_int8, "fused_quantizer", no_compiler)
    with caplog.at_level(logging.WARNING, logger="twostage.retrieval.models.numerics"):
        assert (numerics.auto_int8_engine(packed=True), numerics.auto_int8_engine(packed=False)) == (
            "onednn",
            None,
        )
    assert sum("no g++" in r.getMessage() for r in caplog.records) == 2
    model = torch.nn.Sequential(torch.nn.Linear(64, 128))
    with pytest.raises(ModelLoadError, match=r"int8 engine onednn-fused: torch\.compile could not build"):
        numerics.quantize_int8(model, calibrate=lambda: model(torch.randn(4, 64)), engine="onednn-fused")
    pretend_cpu(monkeypatch, "avx512_vnni")
    assert numerics.auto_int8_engine(packed=True) is None


def test_int8_activations_keep_eight_bits_where_the_cpu_has_vnni() -> None:
    """With VNNI (u8 x s8 summed in 32 bits) activations are quantized to all 8 bits; without it
    torch's 7-bit default stays (fbgemm's AVX2 kernel saturates 16-bit pair sums). The flag is
    read from /proc/cpuinfo. Where 8 bits are used, a Linear's outputs are closer to fp32's than
    the 7-bit path's."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    vnni = numerics.int8_full_range()  # the VNNI flags, narrowed by TWOSTAGE_CPU_FEATURES
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(384, 256))
    x = torch.randn(64, 384) * torch.linspace(0.1, 4.0, 384)  # uneven channels, as real activations
    with torch.no_grad():
        expected = reference(x)
    quantized = torch.nn.Sequential(torch.nn.Linear(384, 256))
    quantized.load_state_dict(reference.state_dict())
    numerics.quantize_int8(quantized)
    layer = quantized[0]
    assert isinstance(layer, DynamicLinear) and numerics.numeric_path(quantized) == "int8-dynamic"
    assert (type(layer) is not DynamicLinear) == vnni
    seven_bit = torch.ops.quantized.linear_dynamic(x, layer._packed_params._packed_params, reduce_range=True)
    with torch.no_grad():
        error, error_7 = (float((y - expected).abs().mean()) for y in (layer(x), seven_bit))
    if vnni:
        assert error < 0.75 * error_7
    else:
        assert error == pytest.approx(error_7)


def test_calibrated_int8_smooths_outlier_channels_and_keeps_down_projections_out_of_int8() -> None:
    """With a calibration run, each int8 Linear divides its inputs by SmoothQuant scales (moved
    into its weights, so the product is unchanged) and a down projection (more inputs than
    outputs, as BERT's FFN output) runs in bf16 where the CPU has it, fp32 elsewhere. On inputs
    with a few outlier channels (what transformer activations look like) the calibrated block
    is closer to fp32 than plain dynamic int8. A head (a cross-encoder's one-output classifier)
    stays in fp32."""
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64), torch.nn.Linear(64, 1)
    )
    x = torch.randn(128, 64)
    x[:, :3] *= 40.0  # outlier channels
    with torch.no_grad():
        expected = reference(x)

    def copy() -> torch.nn.Module:
        clone = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64), torch.nn.Linear(64, 1)
        )
        clone.load_state_dict(reference.state_dict())
        return clone

    plain, calibrated = copy(), copy()
    numerics.quantize_int8(plain)
    numerics.quantize_int8(calibrated, calibrate=lambda: calibrated(x[:16]))
    assert isinstance(calibrated[0], numerics.SmoothedLinear)
    down = numerics.Bf16Linear if numerics.native_bf16() else torch.nn.Linear
    assert type(calibrated[2]) is down and numerics.numeric_path(calibrated) == "int8-dynamic"
    assert type(calibrated[3]) is torch.nn.Linear and type(plain[3]) is torch.nn.Linear  # the head
    smoothed = calibrated[0]
    with torch.no_grad():
        # the scales move range from activations to weights without changing the product
        unscaled = smoothed.linear.weight().dequantize() * smoothed.inverse_scale[None, :]
        assert torch.allclose(unscaled, reference[0].weight, atol=0.05)
        error_plain, error_calibrated = (float((m(x) - expected).abs().mean()) for m in (plain, calibrated))
    assert error_calibrated < 0.5 * error_plain
    # a reranker's path: the down projection in int8 too, behind its own scales; the head stays fp32
    all_int8 = copy()
    numerics.quantize_int8(all_int8, calibrate=lambda: all_int8(x[:16]), int8_down=True)
    assert isinstance(all_int8[2], numerics.SmoothedLinear) and type(all_int8[3]) is torch.nn.Linear
    with torch.no_grad():
        assert float((all_int8(x) - expected).abs().mean()) < error_plain


def test_a_reranker_packs_int8_for_onednn_where_the_cpu_has_amx_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's kernels use AMX-INT8, fbgemm's do not: `int8_engine` picks oneDNN only there. Layers
    packed for it give the same products as fbgemm's within int8 rounding, and the process-wide
    engine is back to what it was after packing."""
    pretend_cpu(monkeypatch, "avx512_vnni", "amx_int8")
    assert numerics.int8_engine() == "onednn"
    pretend_cpu(monkeypatch, "avx512_vnni")
    assert numerics.int8_engine() is None
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(96, 64)
    before = torch.backends.quantized.engine
    outputs = {}
    for engine in ("onednn", None):
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        model.load_state_dict(reference.state_dict())
        numerics.quantize_int8(model, calibrate=lambda m=model: m(x[:16]), int8_down=True, engine=engine)
        assert torch.backends.quantized.engine == before
        assert [m.engine for m in model if isinstance(m, numerics.SmoothedLinear)] == [engine or before] * 2
        with torch.no_grad():
            outputs[engine] = model(x)
    with torch.no_grad():
        scale = float(reference(x).abs().mean())
    assert float((outputs["onednn"] - outputs[None]).abs().mean()) < 0.02 * scale


def test_cpu_inference_keeps_freed_memory_unless_the_user_tunes_glibc() -> None:
    """The allocator settings apply in a fresh process on glibc Linux; a `MALLOC_*` variable of the
    user's turns them off."""
    import subprocess
    import sys

    code = "from twostage.retrieval.models.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"MALLOC_ARENA_MAX": "2"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("True", "False")


def test_int8_on_a_cpu_with_amx_points_to_bf16(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cross_encoder_dir: Path,
    model_cache: Path,
) -> None:
    """quantize=int8 still loads int8 where AMX makes bf16 as fast and closer to fp32, with one
    warning saying so; elsewhere it says nothing."""
    settings = Settings(
        reranker={"model": str(cross_encoder_dir), "quantize": "int8"}, cache_dir=model_cache, device="cpu"
    )
    pretend_cpu(monkeypatch, "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni")
    with caplog.at_level(logging.WARNING, logger="twostage.retrieval.models.numerics"):
        assert load_reranker(settings).numerics.startswith("int8-")
    advice = [r.getMessage() for r in caplog.records if "quantize=int8" in r.getMessage()]
    assert len(advice) == 1 and "set dtype=bfloat16 and quantize=none" in advice[0], advice
    pretend_cpu(monkeypatch, "avx512_bf16", "avx512_vnni")
    assert numerics.int8_advice("reranker", "m") is None
