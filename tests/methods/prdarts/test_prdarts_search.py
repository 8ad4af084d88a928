"""Genotype derivation against an independent NumPy port, strict genotype JSON, a search step,
and an evaluation network that rebuilds, trains, saves and reloads."""
import json

import numpy as np
import pytest
import torch

from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.layers.sparse import count_nonzeros, keep_count, sparse_layers
from prunekit.methods.prdarts import (DARTS_V2, DASS, EvalNetwork, EvalSchedule, Genotype, PRDartsConfig, SuperNet,
                                      derive_genotype, load_network, network_report, random_genotype, save_network,
                                      search, train_at_density)
from prunekit.methods.prdarts.architect import Architect
from prunekit.methods.prdarts.evalnet import build_from_meta
from prunekit.methods.prdarts.hooks import ArchitectHook
from prunekit.methods.prdarts.ops import PRIMITIVES
from prunekit.methods.prdarts.search import prepare_phase_

NONE = PRIMITIVES.index("none")


def _numpy_parse(alpha: np.ndarray, steps: int):
    """Reference: numpy softmax, then for each node the two inputs whose best non-none weight is
    largest (np.lexsort: larger first, lower index on ties) and their non-none argmax."""
    e = np.exp(alpha - alpha.max(1, keepdims=True))
    w = e / e.sum(1, keepdims=True)
    masked = w.copy()
    masked[:, NONE] = -np.inf
    gene, start = [], 0
    for i in range(steps):
        rows = masked[start:start + i + 2]
        best = rows.max(1)
        order = np.lexsort((np.arange(i + 2), -best))[:2]
        gene += [(PRIMITIVES[int(np.argmax(rows[j]))], int(j)) for j in order]
        start += i + 2
    return tuple(gene)


@pytest.mark.parametrize("seed", range(5))
def test_derivation_equals_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    a_n, a_r = rng.normal(size=(14, 8)), rng.normal(size=(14, 8))
    if seed == 0:  # ties: equal rows and a large `none` that must be ignored
        a_n[3] = a_n[2]
        a_n[:, NONE] = 10.0
        a_r[5:9] = a_r[5]
    g = derive_genotype(torch.tensor(a_n), torch.tensor(a_r))
    assert g.normal == _numpy_parse(a_n, 4) and g.reduce == _numpy_parse(a_r, 4)
    assert g.normal_concat == (2, 3, 4, 5)


def test_derivation_on_a_hand_made_alpha():
    a = torch.full((14, 8), -5.0)
    a[0, PRIMITIVES.index("sep_conv_3x3")] = 3.0  # node 0: inputs 0 and 1
    a[1, PRIMITIVES.index("skip_connect")] = 2.0
    a[2, NONE] = 9.0  # node 1: edge from input 0 is mostly `none`; its best real op is tiny
    a[3, PRIMITIVES.index("max_pool_3x3")] = 1.0
    a[4, PRIMITIVES.index("dil_conv_5x5")] = 1.5
    g = derive_genotype(a, a)
    assert g.normal[:4] == (("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1))


def test_genotype_json_round_trip_and_strict_validation():
    for g in (DARTS_V2, DASS, random_genotype(3)):
        assert Genotype.from_json(g.to_json()) == g
    bad = DARTS_V2.to_dict()
    for key, value in (("normal", [["__import__('os')", 0]] + bad["normal"][1:]),
                       ("normal", [["sep_conv_3x3", 2]] + bad["normal"][1:]),
                       ("normal", [["none", 0]] + bad["normal"][1:]),
                       ("reduce_concat", [2, 3, 9])):
        with pytest.raises(CheckpointError):
            Genotype.from_dict({**bad, key: value})
    with pytest.raises(CheckpointError):
        Genotype.from_dict({**bad, "extra": 1})
    assert DASS.parameter_free_share() == 12 / 16


def _tiny_data(n=2, size=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


def test_search_step_changes_alpha_and_scores_not_frozen_weights():
    torch.manual_seed(0)
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.5, pretrain_epochs=0,
                        score_epochs=1, finetune_epochs=0, arch_during_scores=True, unrolled=False)
    net = SuperNet(2, 3, 3, 1, 1)
    prepare_phase_(net, "scores", cfg)
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if "scores" not in n and "alpha" not in n}
    scores = {n: p.detach().clone() for n, p in net.named_parameters() if "scores" in n}
    alphas = [a.detach().clone() for a in net.alphas()]
    arch = Architect(net, lr=0.01)
    hook = ArchitectHook(net, arch, _tiny_data(seed=1), cfg, "scores")
    from prunekit.engine.train import TrainConfig, train

    train(net, _tiny_data(1), None, TrainConfig(epochs=1, lr=0.1), hooks=[hook], progress=False, device="cpu")
    now = dict(net.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in weights.items())  # frozen weights untouched
    assert any(not torch.equal(now[n], s) for n, s in scores.items())
    assert all(not torch.equal(a, b) for a, b in zip(net.alphas(), alphas))


def test_search_runs_three_phases_and_logs(tmp_path):
    cfg = PRDartsConfig(channels=2, layers=3, steps=2, multiplier=2, density=0.2, pretrain_epochs=1,
                        score_epochs=1, finetune_epochs=1, unrolled=False)
    res = search(cfg, _tiny_data(), _tiny_data(seed=2), num_classes=3, device="cpu", out_dir=tmp_path)
    assert [h["phase"] for h in res.history] == ["pretrain", "scores", "finetune"]
    for h in res.history:
        assert 0 <= h["alpha_entropy_normal"] <= np.log(8) + 1e-9 and 0 <= h["param_free_share"] <= 1
    assert res.history[1]["arch_loss"] is None  # the architect rests while the scores train (authors' default)
    assert len(list((tmp_path / "genotypes").glob("*.json"))) == 3
    assert Genotype.from_json((tmp_path / "genotype.json").read_text()) == res.genotype
    # every sparse layer of the supernet keeps exactly its top-k
    for _, m in sparse_layers(res.supernet):
        assert int(m.mask().sum()) == keep_count(m.weight.numel(), 0.2)


@pytest.mark.parametrize("unrolled", [False, True])
def test_search_uses_the_architect_order_it_is_asked_for(unrolled, monkeypatch):
    """unrolled=True reaches the second-order gradient (with the train batch and the weight
    optimizer the engine hook passes); unrolled=False never does."""
    calls = []
    real = Architect._unrolled_gradient
    monkeypatch.setattr(Architect, "_unrolled_gradient",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.5, pretrain_epochs=1,
                        score_epochs=0, finetune_epochs=0, unrolled=unrolled)
    search(cfg, _tiny_data(1), _tiny_data(1), num_classes=3, device="cpu")
    assert bool(calls) == unrolled


def test_unrolled_architect_without_a_train_batch_says_so():
    torch.manual_seed(0)
    net = SuperNet(channels=2, num_classes=3, layers=3, steps=1, multiplier=1)
    with pytest.raises(ConfigError, match="unrolled"):
        Architect(net, unrolled=True).gradient(None, _tiny_data(1)[0])


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="multiplier"):
        PRDartsConfig(steps=2, multiplier=3)
    with pytest.raises(ConfigError, match="density"):
        PRDartsConfig(density=0.0)


def test_evaluation_network_rebuilds_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    geno = Genotype.from_json(json.dumps(random_genotype(7).to_dict()))
    net = EvalNetwork(geno, channels=4, num_classes=3, layers=3, auxiliary=True)
    data = _tiny_data(2, size=32)
    hist = train_at_density(net, 0.1, data, None, EvalSchedule(dense_epochs=1, score_epochs=1, finetune_epochs=1),
                            device="cpu")
    assert [h["phase"] for h in hist] == ["dense", "scores", "finetune"]
    x = torch.randn(2, 3, 32, 32)
    nz = count_nonzeros(net)
    assert nz["nonzero"] <= 0.1 * nz["total"] + 60  # per-layer rounding: at most one extra weight per layer
    path = save_network(net, tmp_path / "net.safetensors", x)
    again = load_network(path).eval()
    net.eval()
    torch.testing.assert_close(again(x), net(x), atol=0, rtol=0)
    assert count_nonzeros(again) == nz
    rep = network_report(net, x, repeats=3)
    head = count_nonzeros(net.auxiliary_head)  # training only: not in the report
    assert rep["nonzero"] == nz["nonzero"] - head["nonzero"] and rep["total"] == nz["total"] - head["total"]
    assert rep["nonzero_macs"] < rep["macs"] and rep["speedup_claimed"] == 1.0
    with pytest.raises(CheckpointError):
        build_from_meta({**net.spec, "layers": "3"})


def test_alpha_in_weight_optimizer_switch():
    from prunekit.engine.hooks import Hook
    from prunekit.engine.train import TrainConfig, train

    class Spy(Hook):
        def bind(self, state):
            self.ids = {id(p) for g in state.optimizer.param_groups for p in g["params"]}

    for flag in (False, True):
        cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.5, pretrain_epochs=1,
                            score_epochs=0, finetune_epochs=0, unrolled=False, alpha_in_weight_optimizer=flag)
        net = SuperNet(2, 3, 3, 1, 1)
        prepare_phase_(net, "pretrain", cfg)
        spy = Spy()
        hook = ArchitectHook(net, Architect(net), _tiny_data(1), cfg, "pretrain")
        train(net, _tiny_data(1), None, TrainConfig(epochs=1), hooks=[hook, spy], device="cpu", progress=False)
        assert (id(net.alpha_normal) in spy.ids) == flag  # the authors' code: the weight SGD steps alpha too


def test_smoothing_term_is_off_by_default_and_acts_when_asked():
    from types import SimpleNamespace

    net = SuperNet(2, 3, 3, 1, 1)
    x, y = _tiny_data(1)[0]
    for beta, expect_term in ((0.0, False), (6.0, True)):
        cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, unrolled=False, smooth_beta=beta)
        hook = ArchitectHook(net, Architect(net), _tiny_data(1), cfg, "pretrain", step_alpha=False)
        hook.bind(SimpleNamespace(batch=(x, y)))
        term = hook.extra_loss(net, 0)
        assert (term is not None) == expect_term
        if expect_term:
            assert term.item() > 0 and term.requires_grad


@pytest.mark.parametrize("beta, std", [(6.0, 0.1), (3.0, 0.3)])
def test_smoothing_term_equals_the_written_out_kl(beta, std):
    """beta * KL(softmax(net(x)) || softmax(net(x + std * eps))), averaged over the batch, with the
    same noise eps drawn again."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    net = SuperNet(2, 3, 3, 1, 1).double().eval()  # double: the term is small next to float32 rounding
    x, y = _tiny_data(1)[0]
    x = x.double()
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, unrolled=False, smooth_beta=beta,
                        smooth_noise_std=std)
    hook = ArchitectHook(net, Architect(net), _tiny_data(1), cfg, "pretrain", step_alpha=False)
    hook.bind(SimpleNamespace(batch=(x, y)))
    torch.manual_seed(11)
    term = hook.extra_loss(net, 0)
    torch.manual_seed(11)
    eps = torch.randn_like(x)
    with torch.no_grad():
        clean = torch.softmax(net(x), 1)
        noisy = torch.softmax(net(x + std * eps), 1)
        want = beta * (clean * (clean.log() - noisy.log())).sum() / len(x)
    torch.testing.assert_close(term.detach().double(), want, rtol=1e-5, atol=1e-9)



@pytest.mark.parametrize("edit", [dict(layers=4096), dict(channels=4096), dict(in_channels=4096),
                                  dict(num_classes=4096)])
def test_a_network_file_whose_sizes_were_edited_is_refused_before_it_is_built(tmp_path, edit):
    """The description's sizes are checked against the stored tensors before any network is built:
    4096 layers of 4096 channels would otherwise ask for terabytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from prunekit.methods.prdarts.evalnet import GENOTYPE_META

    from prunekit.methods.prdarts.network import harden_
    from prunekit.surgery import tensor_file

    net = EvalNetwork(DARTS_V2, channels=4, num_classes=10, layers=3)
    harden_(net)  # as after training: plain layers
    path = save_network(net, tmp_path / "net.safetensors", torch.zeros(1, 3, 8, 8))
    load_network(path)  # the file as written loads: the refusal below is the edit's
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    plan = json.loads(meta["prunekit.plan"])
    plan["meta"][GENOTYPE_META].update(edit)
    meta["prunekit.plan"] = json.dumps(plan)
    # a crafted edit: both checksums match (they detect damage, not edits), so the size check is what refuses it
    meta[tensor_file.META_SHA_KEY] = tensor_file._metadata_sha256(meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="damaged or was edited"):
        load_network(path)


def test_network_report_counts_the_network_without_its_auxiliary_head():
    """The auxiliary head only trains (DARTS counts parameters without it; the MACs and latency are
    those of eval mode, without it): the report's weights are those of the same network built
    without the head, and each layer keeps its top-k."""
    from prunekit.layers.sparse import harden_, set_density_

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    plain = EvalNetwork(DARTS_V2, channels=4, num_classes=10, layers=3, auxiliary=False)
    net = EvalNetwork(DARTS_V2, channels=4, num_classes=10, layers=3, auxiliary=True)
    kept = sum(keep_count(m.weight.numel(), 0.2) for n, m in sparse_layers(net) if not n.startswith("auxiliary_head"))
    set_density_(net, 0.2)
    harden_(net)
    rep = network_report(net, x, repeats=2)
    assert rep["total"] == count_nonzeros(plain)["total"]
    assert rep["nonzero"] == kept
    assert rep["macs"] == network_report(plain, x, repeats=2)["macs"]


def test_search_without_score_epochs_finetunes_under_the_score_init_masks(monkeypatch):
    """score_epochs=0 skips the score training, not the score init: the finetune masks are the
    top-k of HYDRA's scaled init, i.e. of |w| after pretraining (not the random kaiming scores the
    supernet was built with)."""
    import importlib

    from prunekit.layers.sparse import scaled_scores, topk_mask

    engine = importlib.import_module("prunekit.engine.train")  # the module (the package exports its function)

    seen = []
    real = engine.train

    def spy(net, *args, hooks=(), **kwargs):
        if hooks[0].phase == "finetune":
            seen.extend(torch.equal(m.mask(), topk_mask(m.weight.abs(), m.num_kept))
                        and torch.equal(m.scores, scaled_scores(m.weight)) for _, m in sparse_layers(net))
        return real(net, *args, hooks=hooks, **kwargs)

    monkeypatch.setattr(engine, "train", spy)
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.3, pretrain_epochs=1, score_epochs=0,
                        finetune_epochs=1, unrolled=False)
    search(cfg, _tiny_data(1), _tiny_data(1, seed=1), num_classes=3, device="cpu")
    assert seen and all(seen)


def test_a_dense_search_is_refused_with_score_epochs_and_runs_without():
    """density=1 has no scores to train (the mask is all ones and bypassed): the score phase's loss
    had no gradient and the search died there with a bare RuntimeError, after the pretraining."""
    with pytest.raises(ConfigError, match="score_epochs=0"):
        PRDartsConfig(density=1.0, score_epochs=1)
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=1.0, pretrain_epochs=1, score_epochs=0,
                        finetune_epochs=1, unrolled=False)
    res = search(cfg, _tiny_data(1), _tiny_data(1, seed=1), num_classes=3, device="cpu")
    assert [h["phase"] for h in res.history] == ["pretrain", "finetune"]
    assert res.nonzeros["nonzero"] == res.nonzeros["total"]


def _layer_macs(net, x, density):
    """Per sample, from each conv/linear layer's output size: (dense MACs, MACs over the k = keep_count
    weights each masked layer keeps; every weight is nonzero at init)."""
    from torch import nn

    dense, kept, handles = [0], [0], []

    def hook(mod, _inp, out):
        positions = out[0].numel() // out.shape[1] if out.dim() > 2 else 1
        dense[0] += mod.weight.numel() * positions
        kept[0] += keep_count(mod.weight.numel(), density) * positions

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net.eval()(x)
    for h in handles:
        h.remove()
    return dense[0], kept[0]


def test_macs_of_a_network_with_score_masked_layers_count_only_the_kept_weights():
    from prunekit.methods.prdarts.network import sparse_macs
    from prunekit.layers.sparse import set_density_

    torch.manual_seed(0)
    net = EvalNetwork(DARTS_V2, channels=4, num_classes=10, layers=3, auxiliary=True)
    set_density_(net, 0.2)
    x = torch.randn(1, 3, 32, 32)
    macs, nonzero_macs = _layer_macs(net, x, 0.2)
    assert nonzero_macs < macs
    assert sparse_macs(net, x) == {"macs": macs, "nonzero_macs": nonzero_macs}
    rep = network_report(net, x, repeats=2)
    assert (rep["macs"], rep["nonzero_macs"]) == (macs, nonzero_macs)
    assert rep["nonzero"] == sum(keep_count(m.weight.numel(), 0.2) for n, m in sparse_layers(net)
                                 if not n.startswith("auxiliary_head"))


def test_a_network_saved_before_hardening_reloads_to_the_same_outputs(tmp_path):
    """Score-masked layers are saved as what they compute (weights and their top-k masks): the
    file reloads, and the network handed in keeps its score-masked layers."""
    from prunekit.layers.sparse import set_density_

    torch.manual_seed(0)
    net = EvalNetwork(DARTS_V2, channels=4, num_classes=3, layers=3, auxiliary=True)
    set_density_(net, 0.2)
    x = torch.randn(2, 3, 32, 32)
    net.train()(x)  # leaves the auxiliary logits of a training step on the network
    net.eval()
    layers = len(sparse_layers(net))
    path = save_network(net, tmp_path / "net.safetensors", x)
    assert len(sparse_layers(net)) == layers
    again = load_network(path).eval()
    torch.testing.assert_close(again(x), net(x), atol=0, rtol=0)
    assert count_nonzeros(again) == count_nonzeros(net)


def test_a_reloaded_baked_network_traces_and_exports_with_the_same_outputs(tmp_path):
    """docs/prdarts.md's export path: reload, bake the masks, then trace or export."""
    from prunekit import bake_masks_
    from prunekit.layers.sparse import set_density_

    torch.manual_seed(0)
    net = EvalNetwork(DARTS_V2, channels=4, num_classes=3, layers=3, auxiliary=True)
    set_density_(net, 0.2)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    baked = bake_masks_(load_network(save_network(net, tmp_path / "net.safetensors", x)).eval())
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(baked(x), want, atol=0, rtol=0)
        torch.testing.assert_close(torch.jit.trace(baked, (x,))(x), want, atol=0, rtol=0)
        torch.testing.assert_close(torch.export.export(baked, (x,)).module()(x), want, atol=0, rtol=0)

def test_a_network_with_another_stem_multiplier_reloads(tmp_path):
    from prunekit.layers.sparse import harden_, set_density_

    torch.manual_seed(0)
    net = EvalNetwork(DARTS_V2, channels=4, num_classes=3, layers=3, stem_multiplier=2)
    set_density_(net, 0.5)
    harden_(net)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    again = load_network(save_network(net, tmp_path / "net.safetensors", x)).eval()
    assert again.stem[0].weight.shape == net.stem[0].weight.shape == (8, 3, 3, 3)
    torch.testing.assert_close(again(x), net(x), atol=0, rtol=0)
    legacy = {k: v for k, v in net.spec.items() if k != "stem_multiplier"}  # files written without the key
    assert build_from_meta(legacy).stem[0].weight.shape[0] == 12


@pytest.mark.parametrize("unrolled", [False, True])
def test_the_architects_batches_are_checked_like_the_engines(unrolled):
    """The architect steps before the engine's forward: int32 labels (which the engine takes)
    crashed it, and labels outside the classes, a batch that is no (inputs, labels) pair or inputs
    of the wrong channel count ended the search with a bare IndexError, ValueError or RuntimeError."""
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.5, pretrain_epochs=1,
                        score_epochs=0, finetune_epochs=0, unrolled=unrolled)
    x, good = torch.randn(2, 3, 8, 8), _tiny_data(1)
    int32 = [(x, torch.tensor([0, 2], dtype=torch.int32))]
    assert search(cfg, int32, int32, num_classes=3, device="cpu").genotype.steps == 1
    with pytest.raises(ConfigError, match="validation .alpha. labels run from 0 to 7"):
        search(cfg, good, [(x, torch.tensor([0, 7]))], num_classes=3, device="cpu")
    with pytest.raises(ConfigError, match="labels run from 0 to 7"):
        search(cfg, [(x, torch.tensor([0, 7]))], good, num_classes=3, device="cpu")
    with pytest.raises(ConfigError, match="validation .alpha. batch 0 is a dict"):
        search(cfg, good, [{"x": x}], num_classes=3, device="cpu")
    gray = [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(ConfigError, match=r"cannot run .* \(2, 1, 8, 8\)"):
        search(cfg, gray, gray, num_classes=3, device="cpu")


def test_training_at_density_one_refuses_score_epochs_and_runs_the_finetune():
    """At density 1 the score and finetune epochs were skipped without a word: a schedule of
    1 + 1 + 1 epochs trained one. There are no scores to train (as for the search, refused); the
    finetune trains the weights as asked."""
    torch.manual_seed(0)
    net = EvalNetwork(DARTS_V2, channels=2, num_classes=3, layers=3)
    with pytest.raises(ConfigError, match="score_epochs=0"):
        train_at_density(net, 1.0, _tiny_data(1), None, EvalSchedule(1, 1, 1), device="cpu")
    hist = train_at_density(net, 1.0, _tiny_data(1), None, EvalSchedule(1, 0, 2), device="cpu")
    assert [h["phase"] for h in hist] == ["dense", "finetune", "finetune"]
    assert count_nonzeros(net)["nonzero"] == count_nonzeros(net)["total"]


def test_the_auxiliary_head_on_images_too_small_for_it_is_one_clear_error():
    """DARTS's auxiliary head pools 5x5 (stride 3) then convolves 2x2: it needs 8x8 maps at two
    thirds of the depth (32x32 inputs). Digits' 8x8 images give 2x2 there; the error names the
    head and the setting, instead of a pooling error deep inside the first training batch."""
    net = EvalNetwork(DARTS_V2, channels=4, num_classes=10, layers=3, auxiliary=True, in_channels=1).train()
    with pytest.raises(ConfigError, match=r"auxiliary head needs feature maps of at least 8x8.*\(2, 2\).*auxiliary=False"):
        net(torch.randn(2, 1, 8, 8))
    net(torch.randn(2, 1, 32, 32))
    assert net.aux_logits.shape == (2, 10)
    net.eval()(torch.randn(2, 1, 8, 8))  # evaluation never runs the head


def test_a_search_that_starts_over_in_a_folder_does_not_keep_the_earlier_ones_logs(tmp_path):
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    cfg = PRDartsConfig(channels=2, layers=3, steps=1, multiplier=1, density=0.5, pretrain_epochs=1,
                        score_epochs=1, finetune_epochs=1, unrolled=False)
    for seed in (0, 1):
        search(cfg.replace(seed=seed), data, data, 3, out_dir=tmp_path, ckpt_dir=tmp_path / "ckpt")
    rows = [json.loads(line) for line in (tmp_path / "alphas.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["pretrain", "scores", "finetune"]
    assert len((tmp_path / "search_log.jsonl").read_text().splitlines()) == 3  # one record per epoch
    assert len(list((tmp_path / "genotypes").glob("*.json"))) == 3


def test_resuming_the_evaluation_training_with_another_cell_is_refused(tmp_path):
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    schedule = EvalSchedule(1, 1, 1, 0.01, 0.1, seed=0)
    train_at_density(EvalNetwork(DARTS_V2, 4, 3, 3), 0.5, data, None, schedule, ckpt_dir=tmp_path)
    other = Genotype.from_dict({**DARTS_V2.to_dict(), "reduce": [
        ("avg_pool_3x3" if op == "max_pool_3x3" else op, j) for op, j in DARTS_V2.to_dict()["reduce"]]})
    with pytest.raises(CheckpointError, match="other settings .*network"):
        train_at_density(EvalNetwork(other, 4, 3, 3), 0.5, data, None, schedule, ckpt_dir=tmp_path,
                         resume=True)
    # a settings file written before the network was recorded still resumes
    path = tmp_path / "settings.json"
    record = json.loads(path.read_text())
    del record["config"]["network"]
    path.write_text(json.dumps(record))
    train_at_density(EvalNetwork(DARTS_V2, 4, 3, 3), 0.5, data, None, schedule, ckpt_dir=tmp_path, resume=True)


def test_the_report_says_when_layers_keep_more_weights_than_the_density_asks():
    from prunekit.methods.prdarts.run import _density_note

    assert _density_note({"density": 0.3, "layers_at_one_weight": 0}) == ""
    assert "2 masked layer(s) keep one weight where density 0.001" in _density_note(
        {"density": 0.001, "layers_at_one_weight": 2})
