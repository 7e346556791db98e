"""`LoRARuntime`: active LoRAs stay low-rank and unfused; a schedule gives their weights per layer, step and pass.

It plugs into a diffusers pipeline without copying pipeline code:

- each adapted Linear/Conv2d is replaced by an `AdaptedLayer` wrapper (`fusion.layers`);
- the UNet's ``forward`` is wrapped on the instance: before each call the runtime learns the step (the timestep's
  index in ``pipe.scheduler.timesteps``, else the step set by `set_step` / `on_step_end`), the CFG branch of
  each sample (diffusers puts the unconditional half first), asks the schedule for the weights and the passes,
  and hands every layer its per-sample weights; multi-pass schedules (Composite, caches) get their batch rebuilt
  and their outputs combined here, in one UNet call;
- the text encoders get a forward pre-hook that sets the schedule's text weights.

When every sample of a call shares its weights (Merge, block weights, Switch, start/stop; no grad), the layers
fold the current weights into their base weights (``W0 + Σ w ΔW``, recomputed only for layers whose weights
changed; a layer whose re-fold would cost more than its low-rank forward, by `AdaptedLayer.lowrank_cost`, runs
low-rank instead, its weights folded into its up factor: the ``shared`` plan), so a step with unchanged weights
costs what the base model costs. Per-branch or per-pass weights run the low-rank path: without grad, each segment
of samples that share weights (a CFG half, a Composite pass) runs only the ranks of its non-zero LoRAs on its own
rows (``segments``) where the cost model finds that cheaper than one batched product with per-sample scales
(``per_sample``, also the path with grad: it is differentiable in the weights, for gate training).
``strategy="lowrank"`` never folds. The original weights are kept: `unfuse`, `deactivate` and `remove` restore
them bit for bit.

Do not deep-copy a model while a runtime is attached (the copy holds wrapped layers and possibly folded
weights); `remove()` first.
"""
from __future__ import annotations

import inspect
import types
from typing import Mapping, Sequence

import torch
from torch import nn

from studio.library.canonical import LoRA, ModuleLoRA, module_shapes, resolve_module

from .layers import ADAPTABLE, AdaptedLayer
from .schedules import Binding, Merge, Pass, Schedule

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
STRATEGIES = ("auto", "lowrank")


class _Group:
    """The adapted layers of one model and the index tables that turn weights ``[R, N, L]`` into per-layer plans.

    Per call it does the bookkeeping for all layers at once (one gather, vectorised per-layer tests, one
    transfer to the device) and only touches the layers whose weights changed since the previous call.
    """

    def __init__(self, layers: list[AdaptedLayer], columns: list[int], n_columns: int):
        self.layers = layers
        fast, fast_layer, fast_pos, dense, dense_layer = [], [], [], [], []
        self.fast_slices, self.dense_slices = [], []
        for k, (layer, col) in enumerate(zip(layers, columns)):
            a = len(fast)
            for i, r in zip(layer.fast_ids, layer.fast_ranks):
                fast += [i * n_columns + col] * r
                fast_layer += [k] * r
            fast_pos += list(range(len(fast) - a))
            self.fast_slices.append((a, len(fast)))
            a = len(dense)
            for i in layer.dense_ids:
                dense.append(i * n_columns + col)
                dense_layer.append(k)
            self.dense_slices.append((a, len(dense)))
        self.fast_index = torch.tensor(fast, dtype=torch.long)
        self.fast_layer = torch.tensor(fast_layer, dtype=torch.long)
        self.fast_pos = torch.tensor(fast_pos, dtype=torch.long)  # rank index within its layer
        self.dense_index = torch.tensor(dense, dtype=torch.long)
        self.dense_layer = torch.tensor(dense_layer, dtype=torch.long)
        # what the layers hold now: (fast weights, dense weights, patching allowed) for a call whose samples share
        # their weights, or (segments, their fast rows, their dense rows) for per-sample weights; None: unknown
        self.last: tuple | None = None
        self.last_multi: tuple | None = None

    def _per_layer_any(self, fast_values: torch.Tensor, dense_values: torch.Tensor) -> list[bool]:
        f, d = self._per_layer(fast_values, dense_values)
        return [a or b for a, b in zip(f, d)]

    def _per_layer(self, fast_values: torch.Tensor, dense_values: torch.Tensor) -> tuple[list[bool], list[bool]]:
        """Per layer: whether any of its fast / dense entries is non-zero."""
        n = len(self.layers)
        f = torch.zeros(n).index_add_(0, self.fast_layer, fast_values.detach().float().abs())
        d = torch.zeros(n).index_add_(0, self.dense_layer, dense_values.detach().float().abs())
        return (f > 0).tolist(), (d > 0).tolist()

    def _rank_ranges(self, values: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """Per row of ``values [S, fast entries]`` and per layer: the first and the last position (within the layer's
        ranks) of a non-zero entry; ``last = -1`` where all are 0. LoRAs are contiguous rank blocks of the factors."""
        n_rows, n_layers = values.shape[0], len(self.layers)
        nz = values.detach() != 0
        big = 1 << 30
        target = self.fast_layer.expand(n_rows, -1)
        pos = self.fast_pos.expand(n_rows, -1)
        first = torch.full((n_rows, n_layers), big, dtype=torch.long).scatter_reduce_(
            1, target, torch.where(nz, pos, big), "amin")
        last = torch.full((n_rows, n_layers), -1, dtype=torch.long).scatter_reduce_(
            1, target, torch.where(nz, pos, -1), "amax")
        return first.tolist(), last.tolist()

    def _gather(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = weights.float().reshape(weights.shape[0], -1)
        return flat[:, self.fast_index], flat[:, self.dense_index]

    def configure(self, weights: torch.Tensor, segments: list[tuple[int, int]] | None, allow_patch: bool) -> None:
        """Set every layer's mode and plan for a call whose samples use rows `segments` (row, count) of `weights`."""
        gf, gd = self._gather(weights)
        rows = [0] if segments is None else sorted({r for r, _ in segments})
        r0 = rows[0]
        uniform = all(torch.equal(gf[r], gf[r0]) and torch.equal(gd[r], gd[r0]) for r in rows[1:])
        if uniform:
            self._uniform(gf[r0], gd[r0], allow_patch)
        else:
            self._multi(gf, gd, segments)

    @property
    def device(self):
        return self.layers[0].base.weight.device if self.layers else None

    def _uniform(self, wf: torch.Tensor, wd: torch.Tensor, patch: bool) -> None:
        """Every sample shares the weights: for the layers whose weights changed since the last call, fold them
        into the base weight (when `patch`, unless the cost model finds the low-rank forward cheaper than the
        re-fold) or into the low-rank factors."""
        cache = not torch.is_grad_enabled()  # with grad the factors must be rebuilt in this call's graph
        last = self.last
        self.last_multi = None
        changed = None  # None: every layer
        if cache and last is not None and last[2] == patch:
            if torch.equal(wf, last[0]) and torch.equal(wd, last[1]):
                return
            changed = self._per_layer_any(wf != last[0], wd != last[1])
        fast_on, dense_on = self._per_layer(wf, wd)
        # without grad only the non-zero rank range of each layer runs (with grad every rank keeps its gradient)
        first, last_pos = self._rank_ranges(wf[None]) if cache else ([None], [None])
        first, last_pos = first[0], last_pos[0]
        device = self.device
        wf_d, wd_d = wf.to(device), wd.to(device)  # one transfer per call, sliced per layer below
        for k, layer in enumerate(self.layers):
            if changed is not None and not changed[k]:
                continue
            a, b = self.fast_slices[k]
            c, d = self.dense_slices[k]
            f = wf_d[a:b] if fast_on[k] else None
            g = wd_d[c:d] if dense_on[k] else None
            ranks = (first[k], last_pos[k] + 1) if f is not None and first is not None else None
            if f is None and g is None:
                layer.restore()
                layer.set_off()
            elif patch and not layer.lowrank_cheaper(ranks):
                layer.patch(f, g, ranks)
            else:
                layer.restore()
                layer.set_shared(f, g, ranks)
        self.last = (wf.detach().clone(), wd.detach().clone(), patch) if cache else None

    def _multi(self, gf: torch.Tensor, gd: torch.Tensor, segments: list[tuple[int, int]]) -> None:
        """Samples in segments with different weights: the low-rank path, per segment (no grad, when cheaper)
        or with per-sample scales."""
        if self.last is not None:
            for layer in self.layers:
                layer.restore()
            self.last = None
        index = torch.tensor([r for r, _ in segments])
        counts = [n for _, n in segments]
        batch = sum(counts)
        gfs, gds = gf[index], gd[index]  # [S, ...]: each segment's weights
        grad = torch.is_grad_enabled()
        if not grad:
            key = tuple(segments)
            last = self.last_multi
            if last is not None and last[0] == key and torch.equal(last[1], gfs) and torch.equal(last[2], gds):
                return
        device = self.device
        counts_t = torch.tensor(counts)
        sf = None
        sd = torch.repeat_interleave(gds, counts_t, dim=0).to(device) if gds.shape[1] else None
        dense_on = self._per_layer(torch.zeros(gf.shape[1]), gds.abs().sum(0))[1]
        if grad:
            sf = torch.repeat_interleave(gfs, counts_t, dim=0).to(device)
            fast_on = self._per_layer(gfs.abs().sum(0), torch.zeros(gd.shape[1]))[0]
            for k, layer in enumerate(self.layers):
                (a, b), (c, d) = self.fast_slices[k], self.dense_slices[k]
                layer.restore()
                layer.set_per_sample(sf[:, a:b] if fast_on[k] else None, sd[:, c:d] if dense_on[k] else None)
            self.last_multi = None
            return
        # each segment's non-zero rank range per layer
        n_seg = len(segments)
        first, last_pos = self._rank_ranges(gfs)
        bounds = [0]
        for n in counts:
            bounds.append(bounds[-1] + n)
        gfs_d = gfs.to(device)
        for k, layer in enumerate(self.layers):
            (a, b), (c, d) = self.fast_slices[k], self.dense_slices[k]
            layer.restore()
            g = sd[:, c:d] if dense_on[k] else None
            segs = [(s, first[s][k], last_pos[s][k] + 1) for s in range(n_seg) if last_pos[s][k] >= 0]
            if not segs:
                if g is None:
                    layer.set_off()
                else:
                    layer.set_per_sample(None, g)
            elif layer.segments_cheaper([(counts[s], k1 - k0) for s, k0, k1 in segs], batch):
                layer.set_segments([(bounds[s], bounds[s + 1], k0, k1, gfs_d[s, a + k0 : a + k1]) for s, k0, k1 in segs],
                                   g, batch)
            else:
                if sf is None:
                    sf = torch.repeat_interleave(gfs, counts_t, dim=0).to(device)
                layer.set_per_sample(sf[:, a:b], g)
        self.last_multi = (tuple(segments), gfs.clone(), gds.clone())

    def patch_all(self, weights: torch.Tensor) -> None:
        """Fold ``weights [N, L]`` into every layer, whatever was there."""
        self.last = self.last_multi = None
        gf, gd = self._gather(weights[None])
        wf, wd = gf[0], gd[0]
        fast_on, dense_on = self._per_layer(wf, wd)
        wf_d, wd_d = wf.to(self.device), wd.to(self.device)
        for k, layer in enumerate(self.layers):
            (a, b), (c, d) = self.fast_slices[k], self.dense_slices[k]
            layer.patch(wf_d[a:b] if fast_on[k] else None, wd_d[c:d] if dense_on[k] else None)

    def restore(self) -> None:
        for layer in self.layers:
            layer.restore()
            layer.set_off()
        self.last = self.last_multi = None


def _fast_factors(m: ModuleLoRA, layer: AdaptedLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(down, up·scale)`` when the module runs on the concatenated low-rank path, else None (dense)."""
    if m.kind not in ("lora", "locon") or "mid" in m.factors or m.dora_scale is not None:
        return None
    if not layer.fast_compatible():
        return None
    w = layer.base.weight
    down, up = m.factors["down"], m.factors["up"]
    r = down.shape[0]
    if down.numel() != r * w[0].numel() or up.numel() != w.shape[0] * r:
        return None
    return down, up.reshape(w.shape[0], r) * m.scale


class LoRARuntime:
    """Attach to a pipeline (``LoRARuntime(pipe)``) or to bare models (``LoRARuntime(unet=..., text_encoder=...)``).

    >>> rt = LoRARuntime(pipe)
    >>> rt.load("star", star_lora); rt.load("ink", ink_lora)
    >>> rt.activate(["star", "ink"], Switch(["star", "ink"], tau=5))
    >>> image = pipe("a star", num_inference_steps=20).images[0]
    """

    def __init__(self, pipe=None, *, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, scheduler=None, strategy: str = "auto",
                 cfg: bool | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: use one of {STRATEGIES}")
        self.pipe = pipe
        components = {}
        given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        for name in ("unet",) + TEXT_COMPONENTS:
            model = given[name]
            if model is None and pipe is not None:
                model = getattr(pipe, name, None)
            if model is not None:
                components[name] = model
        if "unet" not in components:
            raise ValueError("LoRARuntime needs a pipeline with a UNet, or unet=...")
        self.components = components
        self.scheduler = scheduler
        self.strategy = strategy
        self.cfg = cfg
        self.loras: dict[str, LoRA] = {}
        self.skipped: dict[str, list[str]] = {}
        self.layers: dict[str, AdaptedLayer] = {}
        self.groups: dict[str, _Group] = {}
        self.schedule: Schedule | None = None
        self.active_names: list[str] = []
        self.fused = False
        self.step, self.n_steps = 0, 1
        self.last_step: tuple[int, int] | None = None
        self.cache: dict[str, torch.Tensor] = {}
        self.unet_calls = 0
        self.unet_rows = 0
        self._order = {name: i for i, name in enumerate(module_shapes(components))}
        config = getattr(components["unet"], "config", None)
        self.layers_per_block = int(getattr(config, "layers_per_block", 2) or 2) if config is not None else 2
        self._ts_key, self._ts_cpu = None, None
        self._install()

    # ---------------------------------------------------------------- hooks

    def _install(self) -> None:
        for name, model in self.components.items():
            if model.__dict__.get("_fusion_runtime") is not None:
                raise RuntimeError(f"this {name} already has a LoRARuntime attached; remove() it first")
        for model in self.components.values():
            model.__dict__["_fusion_runtime"] = self
        unet = self.components["unet"]
        original = unet.forward
        self._unet_signature = inspect.signature(original)
        self._had_forward = "forward" in unet.__dict__
        self._previous_forward = unet.__dict__.get("forward")

        runtime = self

        def forward(module, *args, **kwargs):
            if module is not unet:  # a deep copy of the model: it runs without the runtime
                return type(module).forward(module, *args, **kwargs)
            return runtime._unet_call(original, *args, **kwargs)

        unet.forward = types.MethodType(forward, unet)  # a bound method: deepcopy rebinds it to the copy
        self._hooks = [self.components[c].register_forward_pre_hook(self._text_hook(c))
                       for c in TEXT_COMPONENTS if c in self.components]

    def _uninstall(self) -> None:
        for model in self.components.values():
            model.__dict__.pop("_fusion_runtime", None)
        unet = self.components["unet"]
        if self._had_forward:
            unet.forward = self._previous_forward
        else:
            unet.__dict__.pop("forward", None)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _allow_patch(self) -> bool:
        return self.strategy == "auto" and not torch.is_grad_enabled()

    def _text_hook(self, component: str):
        def hook(module, args):
            if self.schedule is None or self.fused or component not in self.groups:
                return None
            self.groups[component].configure(self.schedule.text_weights()[None], None, self._allow_patch())
            return None

        return hook

    # ---------------------------------------------------------------- step and branch

    def set_step(self, step: int, n_steps: int) -> None:
        """The step the next UNet call belongs to, when it cannot be read from the pipeline's scheduler."""
        if not 0 <= int(step) < max(int(n_steps), 1):
            raise ValueError(f"step {step} is outside 0..{n_steps - 1}")
        self.step, self.n_steps = int(step), int(n_steps)

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """A ``callback_on_step_end`` for hand-made loops: the next call is step ``step + 1``."""
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        n = len(timesteps) if timesteps is not None and len(timesteps) else self.n_steps
        self.step, self.n_steps = min(step + 1, max(n - 1, 0)), max(n, 1)
        return {}

    def _scheduler(self):
        return self.scheduler if self.scheduler is not None else getattr(self.pipe, "scheduler", None)

    def current_step(self, timestep) -> tuple[int, int]:
        """``(step, n_steps)``: the timestep's index in the scheduler's timesteps, else the step set by hand."""
        timesteps = getattr(self._scheduler(), "timesteps", None)
        if timesteps is not None and timestep is not None and len(timesteps):
            if self._ts_key is not timesteps:
                self._ts_key, self._ts_cpu = timesteps, timesteps.detach().float().cpu()
            t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
            hits = (self._ts_cpu == float(t)).nonzero()
            if len(hits):
                return int(hits[0]), len(timesteps)
        return self.step, self.n_steps

    def _cfg(self, batch: int) -> bool:
        if self.cfg is not None:
            cfg = self.cfg
        elif self.pipe is not None:
            try:
                cfg = bool(self.pipe.do_classifier_free_guidance)
            except Exception:
                cfg = False
        else:
            cfg = False
        if cfg and batch % 2:
            raise RuntimeError(f"classifier-free guidance needs an even batch (uncond half, cond half), got {batch}")
        return cfg

    # ---------------------------------------------------------------- the UNet call

    def _unet_call(self, original, *args, **kwargs):
        if self.schedule is None or self.fused or "unet" not in self.groups:
            return original(*args, **kwargs)
        bound = self._unet_signature.bind(*args, **kwargs)
        sample = bound.arguments["sample"]
        step, n_steps = self.current_step(bound.arguments.get("timestep"))
        if self.last_step is not None and step < self.last_step[0]:
            self.cache.clear()  # a new run
        self.last_step = (step, n_steps)
        batch = sample.shape[0]
        cfg = self._cfg(batch)
        half = batch // 2 if cfg else batch
        passes = list(self.schedule.passes(step, n_steps, cfg))
        weights = self.schedule.weights(step, n_steps)
        branches = [p.branch for p in passes]
        standard = branches == (["uncond", "cond"] if cfg else ["cond"]) and not any(p.key or p.reuse for p in passes)
        if standard:
            self.groups["unet"].configure(weights, [(p.row, half) for p in passes], self._allow_patch())
            self.unet_calls += 1
            self.unet_rows += batch
            return original(*args, **kwargs)
        return self._multi_pass(original, bound, passes, weights, batch, half, cfg)

    def _multi_pass(self, original, bound, passes: list[Pass], weights, batch: int, half: int, cfg: bool):
        source = {"uncond": slice(0, half), "cond": slice(half, batch) if cfg else slice(0, batch)}
        todo = [k for k, p in enumerate(passes) if not (p.reuse and p.key in self.cache)]
        outputs: list[torch.Tensor | None] = [None] * len(passes)
        return_dict = bound.arguments.get("return_dict", True)
        if todo:

            def expand(x):
                if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                    return torch.cat([x[source[passes[k].branch]] for k in todo])
                if isinstance(x, dict):
                    return {key: expand(v) for key, v in x.items()}
                if isinstance(x, list):
                    return [expand(v) for v in x]
                if type(x) is tuple:
                    return tuple(expand(v) for v in x)
                return x

            for key in list(bound.arguments):
                bound.arguments[key] = expand(bound.arguments[key])
            self.groups["unet"].configure(weights, [(passes[k].row, half) for k in todo], self._allow_patch())
            result = original(*bound.args, **bound.kwargs)
            self.unet_calls += 1
            self.unet_rows += half * len(todo)
            out = result[0] if isinstance(result, tuple) else result.sample
            for j, k in enumerate(todo):
                outputs[k] = out[j * half : (j + 1) * half]
                if passes[k].key is not None:
                    self.cache[passes[k].key] = outputs[k]
        for k, p in enumerate(passes):
            if outputs[k] is None:
                outputs[k] = self.cache[p.key]
        combined = self.schedule.combine(passes, outputs)
        sample = torch.cat([combined["uncond"], combined["cond"]]) if cfg else combined["cond"]
        if not return_dict:
            return (sample,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)

    # ---------------------------------------------------------------- LoRAs

    def load(self, name: str, lora: LoRA) -> None:
        """Check `lora` against the models and keep it under `name` (modules of absent components are skipped)."""
        if not isinstance(lora, LoRA):
            raise TypeError(f"load() takes a canonical studio.library LoRA, got {type(lora).__name__}")
        if name in self.active_names:
            raise ValueError(f"LoRA {name!r} is active: deactivate() before replacing it")
        unknown, skipped = [], []
        for module, m in lora.modules.items():
            component = module.split(".", 1)[0]
            if component not in self.components:
                skipped.append(module)
                continue
            try:
                target = resolve_module(self.components, module)
            except (AttributeError, KeyError, ValueError):
                unknown.append(module)
                continue
            if isinstance(target, AdaptedLayer):
                target = target.base
            if not isinstance(target, ADAPTABLE):
                unknown.append(f"{module} ({type(target).__name__})")
                continue
            w = target.weight
            shape = m.shape
            n = 1
            for d in shape:
                n *= d
            if shape[0] != w.shape[0] or n != w.numel():
                raise ValueError(f"LoRA {name!r}: {module} has ΔW {tuple(shape)}, the model's weight is {tuple(w.shape)}")
        if unknown:
            raise ValueError(f"LoRA {name!r}: {len(unknown)} module(s) are not Linear/Conv2d modules of this model, "
                             f"e.g. {unknown[:3]}; is it for another base model?")
        if len(skipped) == len(lora.modules):
            raise ValueError(f"LoRA {name!r} adapts only {sorted({s.split('.')[0] for s in skipped})}, which this "
                             f"runtime does not hold ({sorted(self.components)})")
        self.loras[name] = lora
        self.skipped[name] = skipped

    def unload(self, name: str) -> None:
        if name in self.active_names:
            raise ValueError(f"LoRA {name!r} is active: deactivate() first")
        self.loras.pop(name, None)
        self.skipped.pop(name, None)

    def _wrap(self, name: str) -> AdaptedLayer:
        if name in self.layers:
            return self.layers[name]
        parent, attr = self._parent(name)
        layer = AdaptedLayer(getattr(parent, attr), name)
        setattr(parent, attr, layer)
        self.layers[name] = layer
        return layer

    def _unwrap(self, name: str) -> None:
        layer = self.layers.pop(name)
        layer.clear()
        layer.release()
        parent, attr = self._parent(name)
        setattr(parent, attr, layer.base)

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        """The module holding the canonically named layer, and the layer's attribute name in it."""
        component, path = name.split(".", 1)
        model = self.components[component]
        if path.startswith("text_model.") and not hasattr(model, "text_model"):
            path = path.removeprefix("text_model.")  # transformers 5 CLIPTextModel has no text_model level
        parent_path, _, attr = path.rpartition(".")
        return (model.get_submodule(parent_path) if parent_path else model), attr

    def base_weight(self, name: str) -> torch.Tensor:
        """The original weight of a module (unpatched), by canonical name."""
        layer = self.layers.get(name)
        if layer is not None:
            return layer.original if layer.patched else layer.base.weight
        target = resolve_module(self.components, name)
        return target.weight

    # ---------------------------------------------------------------- activation

    def activate(self, names: Sequence[str] | None = None, schedule: Schedule | None = None) -> Schedule:
        """Make `names` (default: the schedule's) the active LoRAs, weighted by `schedule` (default: Merge at 1)."""
        if schedule is None:
            if names is None:
                raise ValueError("activate() needs LoRA names or a schedule")
            schedule = Merge({n: 1.0 for n in names})
        names = list(schedule.names if names is None else names)
        missing = [n for n in names if n not in self.loras]
        if missing:
            raise KeyError(f"LoRA(s) {missing} are not loaded; loaded: {sorted(self.loras)}")
        unplanned = [n for n in schedule.names if n not in names]
        if unplanned:
            raise ValueError(f"the schedule names {unplanned}, which are not among the activated LoRAs {names}")
        unweighted = [n for n in names if n not in schedule.names]
        if unweighted:
            raise ValueError(f"LoRA(s) {unweighted} are activated, but the schedule {schedule.describe()} has no "
                             "weight for them")
        self.deactivate()
        loras = schedule.prepare({n: self.loras[n] for n in names}, self.base_weight, self.layers_per_block)
        per_layer: dict[str, list[tuple[int, ModuleLoRA]]] = {}
        for i, lora in enumerate(loras.values()):
            for module, m in lora.modules.items():
                if module.split(".", 1)[0] in self.components:
                    per_layer.setdefault(module, []).append((i, m))
        ordered = sorted(per_layer, key=lambda n: self._order.get(n, len(self._order)))
        unet_layers = [n for n in ordered if n.startswith("unet.")]
        text_layers = [n for n in ordered if not n.startswith("unet.")]
        binding = Binding(names=list(loras), loras=loras, unet_layers=unet_layers, text_layers=text_layers,
                          layers_per_block=self.layers_per_block)
        schedule.bind(binding)
        with torch.no_grad():
            for module in ordered:
                layer = self._wrap(module)
                fast, dense = [], []
                for i, m in per_layer[module]:
                    factors = _fast_factors(m, layer)
                    if factors is None:
                        dense.append((i, m.delta_weight(layer.base.weight).reshape(layer.base.weight.shape)))
                    else:
                        fast.append((i, *factors))
                layer.set_loras(fast, dense)
        self.groups = {}
        if unet_layers:
            self.groups["unet"] = _Group([self.layers[n] for n in unet_layers], list(range(len(unet_layers))),
                                         len(unet_layers))
        for component in TEXT_COMPONENTS:
            cols = [k for k, n in enumerate(text_layers) if n.split(".", 1)[0] == component]
            if cols:
                self.groups[component] = _Group([self.layers[text_layers[k]] for k in cols], cols, len(text_layers))
        self.schedule = schedule
        self.active_names = list(loras)
        self.cache.clear()
        self.last_step = None
        return schedule

    def deactivate(self) -> None:
        """No active LoRAs: every layer back to its original weight, base output only."""
        self.fused = False
        for layer in self.layers.values():
            layer.clear()
        self.groups = {}
        self.schedule = None
        self.active_names = []
        self.cache.clear()

    # ---------------------------------------------------------------- fusing

    def fuse(self, weights: Mapping[str, float] | None = None) -> None:
        """Fold static weights into the base weights: the schedule's (if static) or ``{name: weight}`` per LoRA.

        While fused the runtime adds nothing at run time; `unfuse` restores the original weights bit for bit.
        """
        if self.schedule is None:
            raise RuntimeError("nothing to fuse: activate() LoRAs first")
        n = len(self.active_names)
        n_unet = len(self.schedule.binding.unet_layers)
        n_text = len(self.schedule.binding.text_layers)
        if weights is None:
            if not self.schedule.static:
                raise ValueError(f"{self.schedule.describe()} changes its weights with the step or the CFG branch; "
                                 "fuse() needs static weights: pass fuse({name: weight}) or use Merge")
            unet = self.schedule.weights(0, 1)
            if any(not torch.equal(unet[r], unet[0]) for r in range(1, unet.shape[0])):
                raise ValueError(f"{self.schedule.describe()} weighs CFG branches differently; it cannot be fused")
            unet, text = unet[0], self.schedule.text_weights()
        else:
            unknown = set(weights) - set(self.active_names)
            if unknown:
                raise KeyError(f"fuse(): {sorted(unknown)} are not active; active: {self.active_names}")
            vec = torch.tensor([float(weights.get(name, 0.0)) for name in self.active_names])
            unet, text = vec[:, None].expand(n, n_unet), vec[:, None].expand(n, n_text)
        for component, group in self.groups.items():
            if component == "unet":
                group.patch_all(unet)
            else:
                group.patch_all(text)
        self.fused = True

    def unfuse(self) -> None:
        """Restore the original weights (bit-exact) and go back to running the schedule."""
        for group in self.groups.values():
            group.restore()
        self.fused = False

    def restore(self) -> None:
        """Put back the original weights now (the next call re-applies the schedule)."""
        self.unfuse()

    def remove(self) -> None:
        """Detach completely: original weights and modules back, hooks removed, LoRAs forgotten."""
        self.deactivate()
        for name in list(self.layers):
            self._unwrap(name)
        self._uninstall()
        self.loras.clear()
        self.skipped.clear()

    def __repr__(self) -> str:
        state = "fused" if self.fused else ("active" if self.schedule else "idle")
        sched = self.schedule.describe() if self.schedule else "-"
        return f"LoRARuntime({state}, loaded={sorted(self.loras)}, schedule={sched}, layers={len(self.layers)})"
