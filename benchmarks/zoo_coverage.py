"""Prune every torchvision classification model (or a set of timm models) at 50% channels and report.

For each model: build, prune with the reference magnitude pruner (L2, local, channel_ratio=0.5,
probing on), run a forward, check the output shape is unchanged and parameters dropped; then
save_pruned, load_pruned into a freshly built model and compare the outputs (column "reload").
Writes benchmarks/results/zoo_coverage.json and docs/zoo_coverage.md.

    python benchmarks/zoo_coverage.py            # all models
    python benchmarks/zoo_coverage.py resnet50   # some models
    python benchmarks/zoo_coverage.py --resume   # all models, keeping the rows of an interrupted run
    python benchmarks/zoo_coverage.py --timm     # TIMM_MODELS (one or two per family) from timm instead
On machines whose torchvision wheel does not match torch, put ../shared/tools on the path first
(this script does it when that folder exists).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOOLS = ROOT.parent / "shared" / "tools"
if SHARED_TOOLS.exists():
    sys.path.insert(0, str(SHARED_TOOLS))
    import torchvision_cpu  # noqa: F401

import torchvision.models as tvm  # noqa: E402

from prunekit.core.environment import environment  # noqa: E402
from prunekit.methods import prune_  # noqa: E402
from prunekit.methods.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.surgery.persist import load_pruned, save_pruned  # noqa: E402

# The largest models (regnet_y_128gf, vit_h_14) need several copies of ~2.5 GB of weights while
# probing; a cap on the address space turns running out of memory into a caught allocation
# error for that one model instead of the kernel killing the whole run.
MEMORY_CAP_GB = 18


# one or two models of each timm family: CNNs, mobile nets, re-parameterised nets, MLP mixers and
# vision transformers with their various attention, pooling and position-embedding schemes
TIMM_MODELS = [
    "resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_nano", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "regnety_002", "resnext26ts", "levit_128s",
    "mobilevit_xxs", "coat_lite_tiny", "poolformer_s12", "ghostnet_100", "rexnet_100", "densenet121", "dla34",
    "cspresnet50", "hrnet_w18_small", "maxvit_tiny_tf_224", "efficientformer_l1", "edgenext_xx_small",
    "convmixer_768_32", "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "beit_base_patch16_224",
    "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224", "twins_pcpvt_small",
    "crossvit_tiny_240", "nf_resnet26", "repvgg_a0", "mobileone_s0", "fastvit_t8", "sequencer2d_s",
    "inception_v4", "xception41", "tresnet_m", "dpn68", "skresnet18", "resnest14d", "gcvit_xxtiny",
    "davit_tiny", "focalnet_tiny_srf", "efficientvit_b0", "ese_vovnet19b_dw",
]


# why a model of the timm set does not prune (checked by hand; shown next to its row)
KNOWN = {
    "nf_resnet26": "its convs standardise their weights in forward (ScaledStdConv2d): the weights reaching "
                   "F.conv2d are computed, so prunekit keeps every channel they touch (counted, not pruned)",
}


def build(name: str, use_timm: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    if use_timm:
        import timm
        model = timm.create_model(name, pretrained=False).eval()
        return model, torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    side = 299 if name.startswith("inception") else 224
    return tvm.get_model(name, weights=None).eval(), torch.randn(1, 3, side, side)


def try_model(name: str, use_timm: bool = False) -> dict:
    t0 = time.perf_counter()
    model, x = build(name, use_timm)
    with torch.no_grad():
        ref = model(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    p0 = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5), x)
    t2 = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    p1 = sum(p.numel() for p in model.parameters())
    ok = out.shape == ref.shape and p1 < p0 and bool(torch.isfinite(out).all())
    t3 = time.perf_counter()
    reload = save_and_reload(name, use_timm, model, result.plan, x, out)
    return {"model": name, "ok": bool(ok), "input": list(x.shape), "params_before": p0, "params_after": p1,
            "macs_before": result.cost_before.macs, "macs_after": result.cost_after.macs,
            "prune_seconds": round(t2 - t1, 2), "reload": reload,
            "reload_seconds": round(time.perf_counter() - t3, 2), "total_seconds": round(time.perf_counter() - t0, 2)}


def save_and_reload(name: str, use_timm: bool, model: torch.nn.Module, plan, x: torch.Tensor,
                    out: torch.Tensor) -> str:
    """"equal" when save_pruned -> load_pruned into a freshly built model gives the very same
    output (torch.equal), "differs" when it runs but disagrees, else the error."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_pruned(model, plan, Path(tmp) / "pruned.safetensors")
            again = load_pruned(build(name, use_timm)[0], path).eval()
            with torch.no_grad():
                got = again(x)
        got = got if isinstance(got, torch.Tensor) else got[0]
        return "equal" if torch.equal(got, out) else "differs"
    except Exception as err:  # report it in the row, keep going
        return f"error: {type(err).__name__}: {str(err)[:150]}"


def _cap_memory(gb: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(gb * 2**30)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(names: list[str], flags: set[str]) -> None:
    _cap_memory(MEMORY_CAP_GB)
    env = environment(ROOT)  # before the run: the code that runs is the code checked out now
    load_before = os.getloadavg()
    torch.manual_seed(0)
    rows = []
    started = time.perf_counter()
    use_timm = "--timm" in flags
    results = ROOT / "benchmarks" / "results" / ("zoo_coverage_timm.json" if use_timm else "zoo_coverage.json")
    done = {}
    if "--resume" in flags and results.exists():  # keep the rows of an interrupted run
        done = {r["model"]: r for r in json.loads(results.read_text())["rows"]}
    for name in names:
        if name in done:
            rows.append(done[name])
            continue
        t0 = time.perf_counter()
        try:
            row = try_model(name, use_timm)
        except Exception as err:  # report every failure, keep going
            row = {"model": name, "ok": False, "error": f"{type(err).__name__}: {str(err)[:200]}",
                   "total_seconds": round(time.perf_counter() - t0, 2)}
        rows.append(row)
        print(("OK  " if row["ok"] else "FAIL") + f" {name} {row['total_seconds']}s {row.get('error', '')}", flush=True)
        _write(results, env, rows, started, load_before, use_timm)  # after every model: an interrupted run keeps its rows
    out = _write(results, env, rows, started, load_before, use_timm)
    if names == (TIMM_MODELS if use_timm else tvm.list_models(module=tvm)):
        write_markdown(out, use_timm)


def _write(results: Path, env: dict, rows: list, started: float, load_before, use_timm: bool = False) -> dict:
    zoo = {"timm": sys.modules["timm"].__version__} if use_timm else {}
    out = {"environment": env, "torchvision": sys.modules["torchvision"].__version__, **zoo,
           "config": MagnitudeConfig(channel_ratio=0.5).to_dict(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_seconds": round(time.perf_counter() - started, 1),
           "load_average_1_5_15min": {"start": [round(v, 2) for v in load_before],
                                      "end": [round(v, 2) for v in os.getloadavg()]},
           "memory_cap_gb": MEMORY_CAP_GB, "rows": rows, "passed": sum(r["ok"] for r in rows), "total": len(rows)}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out, indent=1))
    return out


def _load_note(out: dict) -> str:
    load = out.get("load_average_1_5_15min")
    if not load:
        return ""
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)
    return (f" (load average 1/5/15 min {fmt(load['start'])} at the start, {fmt(load['end'])} at the end, on a shared "
            "machine: the seconds are upper bounds)")


def _reload_cell(row: dict) -> str:
    reload = str(row.get("reload", "not run"))
    return reload.replace("|", "\\|").replace("\n", " ")[:120]


def write_markdown(out: dict, use_timm: bool = False) -> None:
    env = out["environment"]
    size_note = "1x3 at each model's default size" if use_timm else "1x3x224x224 (299 for inception)"
    what = (f"timm {out.get('timm', '?')} models (one or two per family, `TIMM_MODELS`)" if use_timm
            else "classification models")
    lines = [f"# {'timm' if use_timm else 'torchvision'} model-zoo coverage", "",
             f"{out['passed']}/{out['total']} {what} pruned at 50% channels (magnitude L2, local, "
             "classifier kept): forward runs, output shape unchanged, parameters drop.",
             "",
             f"Produced by `python benchmarks/zoo_coverage.py{' --timm' if use_timm else ''}` on {out.get('date', '?')}: "
             f"CPU {env.get('cpu_model')} "
             f"({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads), GPU "
             f"{(env.get('cuda') or {}).get('device_name', 'none')}, torch {env.get('torch')}, torchvision "
             f"{out.get('torchvision', '?')}, python {env.get('python')}, "
             f"prunekit {env.get('prunekit')} (commit {str(env.get('git_commit'))[:10]}"
             f"{', uncommitted changes' if env.get('git_dirty') else ''}). Input "
             f"{size_note}, "
             f"float32, one run per model, {out.get('wall_seconds', '?')} s in all{_load_note(out)}. MACs are per sample "
             "(conv/linear/matmul/attention products). *prune s* is `prune_` alone (tracing, probing, scoring, "
             "removal, costs); *total s* adds model construction, the forwards and the reload check. *reload*: "
             "`save_pruned` then `load_pruned` into a freshly built model gives the identical output (`torch.equal`); "
             f"{sum(r.get('reload') == 'equal' for r in out['rows'])}/{out['total']} do.", "",
             "| model | ok | params before | params after | MACs before | MACs after | prune s | total s | reload | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if "params_before" in r:
            note = "" if r["ok"] else KNOWN.get(r["model"], "output shape changed, non-finite output or no parameter dropped")
            lines.append(f"| {r['model']} | {'yes' if r['ok'] else 'no'} | {r['params_before']/1e6:.2f}M | "
                         f"{r['params_after']/1e6:.2f}M | {r['macs_before']/1e9:.3f}G | {r['macs_after']/1e9:.3f}G | "
                         f"{r['prune_seconds']} | {r['total_seconds']} | {_reload_cell(r)} | {note} |")
        else:
            error = r.get("error", "check failed").replace("|", "\\|").replace("\n", " ")
            error = f"{KNOWN[r['model']]} ({error[:90]}...)" if r["model"] in KNOWN else error
            lines.append(f"| {r['model']} | no | | | | | | {r.get('total_seconds', '')} | | {error} |")
    (ROOT / "docs" / ("zoo_coverage_timm.md" if use_timm else "zoo_coverage.md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    main(args or (TIMM_MODELS if "--timm" in flags else tvm.list_models(module=tvm)), flags)
