"""`SAMTrainer`: transformers.Trainer glue for sparse-layer (SL-SAM) and zero-order (ZO-SAM) sharpness-aware steps.

Per optimizer step t (DESIGN section 2):
  1. select arms S_t (bandit / random / all; held for `selection_interval` steps); every other arm gets
     requires_grad=False while each micro-batch's passes run (no backward cost), and True again after them;
  2. per micro-batch, an ascent direction g on S_t (`sam_mode`, `zo_direction`);
  3. theta <- theta + rho * g / ||g||, stock `Trainer.training_step` (forward + backward on S_t), theta restored;
  4. after the last micro-batch, the bandit learns from the gradient norms; the stock loop clips and steps, with
     the `sparse_update` rule applied around the base optimizer's step (optimizer step hooks).
Under FSDP2 the parameters are sharded DTensors: every update above acts on the local shards, and every norm is a
reduction over them (ascent.py).
"""

import contextlib
import copy
import logging
import os

import numpy as np
import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch.distributed.fsdp import FSDPModule, StateDictType
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arms import group_arms
from .ascent import (
    LookbackAscent,
    ascent_direction,
    cosine_similarity,
    first_moment,
    first_order_direction,
    full,
    grad_norm,
    like,
    perturb,
    restore,
    tensor_norms,
)
from .checkpoint import has_sam_state, load_sam_state, optimizer_state_names, save_lookback, save_sam_state
from .history import SelectionHistory
from .modelcard import add_to_model_card, method_section, sam_options
from .selection import LayerBandit, UniformSelector
from .training_args import SAMTrainingArguments

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed for a private generator, derived from (seed, step, micro-batch) keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class SAMTrainerMixin:
    """Adds SL-SAM / ZO-SAM steps to a `Trainer` subclass: `class MySFT(SAMTrainerMixin, SFTTrainer)`.

    The args must be a `SAMTrainingArguments` (for TRL: a dataclass inheriting from both configs).
    """

    # Attributes that `compute_loss` changes on every call (TRL's token metrics and counters): the extra
    # forwards of a SAM step restore them, so only the update pass is counted.
    sam_untracked_attributes = ("_metrics", "_total_train_tokens")

    def __init__(self, *args, **kwargs):
        if len(args) < 2 and kwargs.get("args") is None:
            kwargs["args"] = SAMTrainingArguments(output_dir="trainer_output")
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SAMTrainingArguments):
            raise TypeError(
                f"{type(self).__name__} needs args=SAMTrainingArguments(...), got {type(self.args).__name__}; "
                "for another Trainer's config, make a dataclass that inherits from both."
            )
        self._check_supported()
        self._build_selection()
        self._optimizer_hooks = []
        self._step_started = None
        self._scaler_placeholder = None
        self._micro_batch = None  # the current micro-batch's `_MicroBatch` (its parameter backup), during a step

    def _build_selection(self):
        """Arms, selector, history, trainable-tensor maps and ascent direction of `self.model` under `self.args`;
        built again by a second `train()` and when `model_init` rebuilt the model (a hyperparameter trial may have
        changed the options)."""
        args = self.args
        self.arms, self.always_selected = group_arms(self.model, args.arm_granularity, args.always_selected)
        if not self.arms and not self.always_selected.params:
            raise ValueError("the model has no trainable parameters (every requires_grad is False)")
        if args.layer_selection == "all":
            self.selector = None
        elif not self.arms:
            raise ValueError(
                f"layer_selection={args.layer_selection!r} has no arms to choose from: always_selected="
                f"{args.always_selected} matches every trainable tensor. Use layer_selection='all' or narrower "
                "always_selected patterns."
            )
        elif args.layer_selection == "random":
            self.selector = UniformSelector(len(self.arms), args.selection_budget, seed=args.seed)
        else:
            self.selector = LayerBandit(
                len(self.arms), args.selection_budget, lr=args.bandit_lr, reward=args.bandit_reward,
                min_prob=args.bandit_min_prob, seed=args.seed, arm_sizes=[arm.numel for arm in self.arms],
            )
        self.history = SelectionHistory([arm.name for arm in self.arms])
        self._index_trainable()
        # sam_rho=0 moves nothing: no ascent pass at all, so the step (and the bandit's rewards: the update gradient)
        # is sam_mode='none'.
        self.ascent = None if args.sam_rho == 0 else ascent_direction(args.sam_mode, args.zo_direction,
                                                                     args.zo_num_directions, args.zo_eps)
        # Half-precision weights: epsilon's elements below the dtype's spacing round away when added.
        low = sorted({str(p.dtype) for p in self._trainable.values() if p.dtype in (torch.bfloat16, torch.float16)})
        self._low_precision = self.ascent is not None and bool(low)
        if self._low_precision:
            logger.warning(
                f"Trainable weights in {', '.join(low)}: elements of the perturbation rho * g / ||g|| (and of the "
                "zero-order probe's zo_eps * u) below the dtype's spacing round away when added, e.g. ~1e-2 for bf16 "
                "weights near 1. The logged perturbation_norm is the norm actually applied (rho when nothing is "
                "lost); keep fp32 weights with bf16 autocast (bf16=True), or raise sam_rho / zo_eps."
            )
        self._lookback: dict[str, torch.Tensor] = {}
        self._held = None  # (arms, their probabilities when drawn) of the selection held over selection_interval
        self._window = self._empty_window()

    def _index_trainable(self):
        """Name <-> tensor maps of every trainable tensor (arms and always-selected), and their element count."""
        named = [zip(arm.param_names, arm.params) for arm in self.arms]
        named.append(zip(self.always_selected.param_names, self.always_selected.params))
        self._trainable = {name: p for pairs in named for name, p in pairs}
        self._trainable_numel = sum(p.numel() for p in self._trainable.values())
        self._names = {p: name for name, p in self._trainable.items()}
        self._sharded = False  # whether the maps follow FSDP2's sharded parameters (`_follow_sharded_parameters`)

    def _follow_sharded_parameters(self):
        """FSDP2: accelerate's prepare replaced every parameter by a sharded DTensor; the arms, the always-selected
        tensors and the maps follow the model's parameters again, by name (once per `train()`, before the first step
        or a resume, while every arm requires grad).

        FSDP2 also fixes, lazily at the first forward, each parameter group's gradient dtype from the tensors that
        require grad then: a group whose arms were all frozen in that forward would later reduce-scatter in the
        compute dtype (bf16) and fail to store the gradient of an fp32 shard. It is initialised here instead, with
        every arm on (a no-op once a forward ran). Does nothing without FSDP or once done."""
        if not self.is_fsdp_enabled or self._sharded:
            return
        model = self.accelerator.unwrap_model(self.model)  # the FSDP2 root, under torch.compile too
        self._gather_afresh(model)  # every module holds its sharded parameters
        model._get_fsdp_state()._lazy_init()
        current = dict(model.named_parameters())
        for group in [*self.arms, self.always_selected]:
            group.params = [current[name] for name in group.param_names]
        self._index_trainable()
        self._sharded = True

    def _gather_afresh(self, model):
        """FSDP2: free every unsharded parameter copy, so the next forward gathers the shards as they are now (with
        their requires_grad). A group that keeps its copy after forward (the root's, `reshard_after_forward=False`)
        would otherwise run the next forward on weights from before a perturbation or a probe."""
        if self.is_fsdp_enabled:
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def _check_supported(self):
        args = self.args
        if self.is_deepspeed_enabled:
            raise ValueError("SAMTrainer does not support DeepSpeed yet; use DDP (accelerate_configs/multi_gpu.yaml).")
        plain = args.sam_mode == "none" and args.layer_selection == "all"
        if self.is_fsdp_enabled and not self.accelerator.is_fsdp2 and not plain:
            raise ValueError(
                "SAMTrainer supports FSDP1 only with sam_mode='none' and layer_selection='all' (plain training): its "
                "flattened parameters cannot be perturbed or frozen per tensor. Use FSDP2 (fsdp_version: 2 in the "
                "accelerate config, accelerate_configs/fsdp.yaml) or DDP (accelerate_configs/multi_gpu.yaml)."
            )
        if args.n_gpu > 1:
            raise ValueError(
                "SAMTrainer does not support torch.nn.DataParallel (several GPUs in one process); launch one "
                "process per GPU with `accelerate launch` or `torchrun` (DDP)."
            )
        devices = {str(device) for device in (getattr(self.model, "hf_device_map", None) or {}).values()}
        if len(devices) > 1:
            raise ValueError(
                f"SAMTrainer does not support a model spread over several devices (hf_device_map uses "
                f"{sorted(devices)}): the norms and perturbations of a step expect one device. Load the model on "
                "one device (device_map=None or {'': 0}); for several GPUs, launch one process per GPU (DDP)."
            )
        if args.torch_compile and args.layer_selection != "all":
            raise ValueError(
                f"torch_compile=True cannot be combined with layer_selection={args.layer_selection!r}: each step "
                "freezes the unselected tensors (requires_grad=False) and torch.compile guards on requires_grad, so "
                "every new selection compiles the model again (tiny BERT: 8 graphs in 12 steps, then dynamo hits its "
                "recompile limit and runs the model eagerly). Use layer_selection='all' with torch_compile, or turn "
                "torch_compile off."
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            raise ValueError(
                f"{launched} processes were launched (WORLD_SIZE={launched}) but joined no process group, so each "
                "would train alone; on a machine without GPUs pass --use_cpu (use_cpu=True) so that they join over "
                "gloo (see accelerate_configs/cpu_2proc.yaml)."
            )

    # ----------------------------------------------------------------------------------------------- the step

    def create_optimizer(self, model=None):
        """Stock optimizer, built over every arm (stock code keeps only tensors with requires_grad=True), with the
        `sparse_update` rule hooked around its step."""
        self._set_requires_grad(None)
        optimizer = super().create_optimizer(model)
        for hook in self._optimizer_hooks:
            hook.remove()
        self._optimizer_hooks = []
        if self.selector is not None:
            # A restarted loop (auto_find_batch_size) gets back the optimizer accelerate already wrapped.
            base = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
            self._optimizer_hooks = [base.register_step_pre_hook(self._before_optimizer_step)]
            if self.args.sparse_update == "scale":
                self._optimizer_hooks.append(base.register_step_post_hook(self._after_optimizer_step))
        return optimizer

    def _before_optimizer_step(self, optimizer, args, kwargs):
        """Drops the loss scaler's placeholder gradient (`_end_step`). 'momentum': unselected tensors with optimizer
        state get a zero gradient (the base optimizer moves them along its first moment). 'scale': keep theta of the
        selected arms, for `_after_optimizer_step`. Neither hook acts on a step taken outside a SAM step (resuming
        under FSDP2, torch.distributed.checkpoint initialises the optimizer state with a step at learning rate 0)."""
        if self._step_started is None:
            return
        if self._scaler_placeholder is not None:
            self._scaler_placeholder.grad = None
            self._scaler_placeholder = None
        if self.args.sparse_update == "momentum":
            for p in self._trainable.values():
                if p.grad is None and p in optimizer.state:
                    p.grad = torch.zeros_like(p)
        elif self.args.sparse_update == "scale":
            params = [p for _, _, p in self._arm_params]
            self._before_step = (params, [p.detach().clone() for p in params])

    def _after_optimizer_step(self, optimizer, args, kwargs):
        """'scale': theta <- theta_before + k_i * (theta - theta_before), k_i = min(1 / p_i, sparse_update_max_scale)
        with p_i the probability arm i was drawn with; the always-selected tensors are not scaled."""
        if self._step_started is None:
            return
        params, before = self._before_step
        scale = np.minimum(1.0 / self._held[1], self.args.sparse_update_max_scale)
        with torch.no_grad():  # sub, mul, add: torch 2.10 has no foreach lerp with a list of weights on DTensors
            torch._foreach_sub_(params, before)
            torch._foreach_mul_(params, [float(scale[k]) for k, _, _ in self._arm_params])
            torch._foreach_add_(params, before)
        self._before_step = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._step_started != self.state.global_step:
            self._begin_step()
        inputs = self._prepare_inputs(inputs)
        perturbing = self.ascent is not None
        backup, params, clean_loss, skipped = None, [], None, True
        try:
            if self.selector is not None:
                # Frozen only while this micro-batch's passes run: callbacks, evaluation, checkpoints and the
                # optimizer step outside it see every flag on (the unselected tensors' .grad stays None).
                self._set_requires_grad(self._selected)
            self._gather_afresh(model)  # FSDP2: the next forward gathers the shards with these flags
            if perturbing:
                params, direction, clean_loss = self._ascent_direction(model, inputs, num_items_in_batch)
                if direction is not None:
                    backup, skipped = self._perturb(params, direction)
                del direction
                self._gather_afresh(model)  # ... and at theta + epsilon
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            # Whoever catches this (auto_find_batch_size restarts the loop on out-of-memory) gets the next call
            # starting a fresh step.
            self._step_started = None
            raise
        finally:
            if backup is not None:
                restore(params, backup)
            self._micro_batch = None
            if self.selector is not None:
                self._set_requires_grad(None)
        if perturbing:
            self._window["perturbed_loss"] += loss
            self._window["skipped"] += skipped
            if clean_loss is not None:
                self._window["sharpness"] += loss - clean_loss
        self._micro_step += 1
        if self.accelerator.sync_gradients:
            self._end_step()
        return loss if clean_loss is None else clean_loss

    @torch.no_grad()
    def _perturb(self, params, direction):
        """theta <- theta + epsilon on `params`; returns (the copy of theta to restore, whether the step was left
        unperturbed: a bool on the device, read only when logging). With half-precision weights it also records
        ||theta + epsilon - theta|| as applied."""
        backup, moved = perturb(params, direction, self.args.sam_rho, self.ascent.adaptive,
                                self._micro_batch.backup(params))
        if self._low_precision:
            self._window["applied"] += grad_norm(torch._foreach_sub(params, backup))
            self._window["perturbed"] += 1
        return backup, ~moved

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stock loss. When the forward reaches no selected tensor (every arm drawn is unused by the model), the loss
        has no graph and stock backward would raise; it becomes a leaf that requires grad instead, so the backward
        leaves every .grad None: the ascent is skipped and the step changes nothing. A loss that has no graph with
        every arm on (a custom loss that detaches) is returned as it is, so stock backward raises its error."""
        kept = dict(inputs)  # stock compute_loss may pop the labels; the check below needs them
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.selector is None or not torch.is_grad_enabled() or loss.requires_grad:
            return result
        if not self._loss_has_graph_with_every_arm(model, kept, num_items_in_batch):
            return result
        loss = loss.detach().requires_grad_()
        return (loss, *result[1:]) if return_outputs else loss

    def _loss_has_graph_with_every_arm(self, model, inputs, num_items_in_batch):
        """One more forward with every arm on, run only after a loss without a graph: whether any trainable tensor
        reaches the loss at all."""
        self._set_requires_grad(None)
        try:
            with self._off_the_record():
                return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch).requires_grad
        finally:
            self._set_requires_grad(self._selected)

    def _begin_step(self):
        """Draw S_t for the optimizer step about to start (`training_step` freezes every other arm while its passes
        run)."""
        self._step_started = self.state.global_step
        self._micro_step = 0
        self._follow_sharded_parameters()
        if self.selector is None:
            self._selected = np.arange(len(self.arms))
        else:
            step = self.state.global_step
            if self._held is None or step % self.args.selection_interval == 0:
                selected = self.selector.select(step)
                self._held = (selected, self.selector.probabilities[selected].copy())
            self._selected = self._held[0]
        self._arm_params = [(k, name, p) for k, i in enumerate(self._selected)
                            for name, p in zip(self.arms[i].param_names, self.arms[i].params)]
        always = self.always_selected
        self._params = [p for _, _, p in self._arm_params] + always.params
        self._param_names = [name for _, name, _ in self._arm_params] + always.param_names
        self._rewards = np.zeros(len(self._selected))

    def _end_step(self):
        """After the last micro-batch's backward: bookkeeping, bandit update, lookback buffer."""
        window = self._window
        window["steps"] += 1
        active = sum(p.numel() for p in self._trainable.values() if p.grad is not None) / self._trainable_numel
        window["active"] += active
        window["selected"] += len(self._selected)
        if self.selector is not None:
            self.history.record(self._selected, active)
        bandit, lookback = isinstance(self.selector, LayerBandit), isinstance(self.ascent, LookbackAscent)
        first_order = self.ascent is not None and self.ascent.first_order  # rewards came from the ascent pass
        grads = [p.grad for p in self._params]
        if (bandit and not first_order) or lookback:
            norms = self._tensor_norms(grads)  # one pass and one host transfer, shared by rewards and lookback
        if bandit:
            if not first_order:
                self._rewards = self._arm_norms(norms)
            rewards = self._rewards
            if self.accelerator.num_processes > 1 and not self.is_fsdp_enabled:  # FSDP2's norms are global already
                rewards = self.accelerator.reduce(torch.as_tensor(rewards, device=self.args.device), "mean")
                rewards = rewards.cpu().numpy()
            if not self.selector.update(self._selected, rewards):
                window["bandit_skipped"] += 1
        if lookback and np.isfinite(norms).all():
            for name, g in zip(self._param_names, grads):
                if g is not None:
                    self._lookback[name] = self._lookback[name].copy_(g) if name in self._lookback else g.clone()
        if active == 0 and self.accelerator.scaler is not None:
            # Every drawn arm unused: GradScaler cannot step an optimizer that holds no gradient. One zero gradient
            # passes its inf check; `_before_optimizer_step` drops it before the base optimizer steps.
            self._scaler_placeholder = self._params[0]
            self._scaler_placeholder.grad = torch.zeros_like(self._scaler_placeholder)

    def _ascent_direction(self, model, inputs, num_items_in_batch):
        """(params, direction g, unperturbed loss or None) for this micro-batch; g None: no perturbation."""
        self._micro_batch = source = _MicroBatch(self, model, inputs, num_items_in_batch)
        params, direction = self.ascent.direction(self._params, source)
        if self.ascent.first_order and isinstance(self.selector, LayerBandit):
            # No direction: the gradient overflowed, and the step's rewards are not finite (the bandit skips them).
            self._rewards += np.inf if direction is None else self._arm_norms(
                self._tensor_norms(direction[: len(self._arm_params)]))
        due = direction is not None and not self.ascent.first_order and self._cosine_due()
        if due and grad_norm(direction) > 0:  # a zero-order tie gives g = 0: no direction to compare
            true_grad, _ = self._first_order(model, inputs, num_items_in_batch, params)
            self._window["cosine"].append(cosine_similarity(direction, true_grad))
        return params, direction, source.clean_loss

    def _first_order(self, model, inputs, num_items_in_batch, params):
        """Train-mode loss at theta and its gradient on `params`, .grad untouched: per process under DDP (no_sync);
        averaged over processes under FSDP2, where all share one theta (`_sharded_gradient`)."""
        model.train()
        sharded = self.is_fsdp_enabled
        with contextlib.nullcontext() if sharded else self.accelerator.no_sync(model), self._off_the_record():
            with self.compute_loss_context_manager():
                # A copy: stock compute_loss pops "labels" (label smoothing, compute_loss_func); the update pass
                # still needs them.
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            loss = self._scale_for_accumulation(loss, num_items_in_batch)
            scaler = self.accelerator.scaler
            scaled = scaler.scale(loss) if scaler is not None else loss
            grads = self._sharded_gradient(model, scaled, params) if sharded else first_order_direction(scaled, params)
        return grads, loss.detach()

    def _sharded_gradient(self, model, loss, params):
        """FSDP2: d loss / d params averaged over processes, each process holding its shard, from a backward into .grad
        with FSDP's own reduce-scatter. The gradient accumulated by earlier micro-batches is set aside meanwhile, and
        gradient sync stays on for this micro-batch (no unsharded gradient waits inside FSDP across the ascent pass;
        the trainer's no_sync turns it back on after the micro-batch anyway)."""
        kept = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        model.set_requires_gradient_sync(True)
        try:
            loss.backward()
            return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        finally:
            for p, g in zip(self._params, kept):
                p.grad = g

    def _probe_loss(self, model, probe_inputs):
        """A zero-order probe: the no-grad loss with dropout off, averaged over processes."""
        model.eval()
        self._gather_afresh(model)  # the probe moved the shards since the last forward
        with self._off_the_record(), torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(probe_inputs)).detach()  # a copy, as in `_first_order`
        return self.accelerator.reduce(loss, "mean") if self.accelerator.num_processes > 1 else loss

    @staticmethod
    def _leading_rows(inputs, fraction: float):
        """The leading `fraction` of the micro-batch's rows (at least one)."""
        if fraction == 1:
            return inputs
        rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        keep = max(1, int(round(rows * fraction)))
        return {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
                for k, v in inputs.items()}

    def _scale_for_accumulation(self, loss, num_items_in_batch):
        """The gradient-accumulation scaling stock `training_step` applies before its backward."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    @staticmethod
    def _tensor_norms(grads):
        """||g||_2 of each tensor as float64 numpy (0 for None), in one transfer to the host."""
        norms = np.zeros(len(grads))
        present = [k for k, g in enumerate(grads) if g is not None]
        if present:
            norms[present] = tensor_norms([grads[k] for k in present]).cpu().numpy()
        return norms

    def _arm_norms(self, norms):
        """||grad||_2 per selected arm = sqrt(sum of its tensors' squared norms), from per-tensor norms that start
        aligned with the arms' parameters (always-selected tensors after them are ignored), divided by the fp16 loss
        scale."""
        arm_norms = np.zeros(len(self._selected))
        np.add.at(arm_norms, [k for k, _, _ in self._arm_params], norms[: len(self._arm_params)] ** 2)
        scaler = self.accelerator.scaler
        return np.sqrt(arm_norms) / (scaler.get_scale() if scaler is not None else 1.0)

    def _cosine_due(self):
        k = self.args.sam_cosine_log_steps
        return k > 0 and self._micro_step == 0 and self.state.global_step % k == 0

    @contextlib.contextmanager
    def _off_the_record(self):
        saved = {n: copy.deepcopy(getattr(self, n)) for n in self.sam_untracked_attributes if hasattr(self, n)}
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def _set_requires_grad(self, selected):
        """requires_grad=True on the arms in `selected` (all arms when None), False on the others."""
        on = np.ones(len(self.arms), dtype=bool)
        if selected is not None:
            on[:] = False
            on[selected] = True
        for arm, flag in zip(self.arms, on):
            for p in arm.params:
                p.requires_grad_(bool(flag))

    # ---------------------------------------------------------------------------- logging and checkpoints

    @staticmethod
    def _empty_window():
        return {"steps": 0, "active": 0.0, "selected": 0, "perturbed_loss": 0.0, "sharpness": 0.0, "skipped": 0,
                "bandit_skipped": 0, "cosine": [], "applied": 0.0, "perturbed": 0}

    def log(self, logs, start_time=None):
        """Adds the SAM figures, averaged over the logging window, to the Trainer's training logs."""
        window = self._window
        if "loss" in logs and window["steps"] > 0:
            steps = window["steps"]
            if self.ascent is not None:
                logs["loss_perturbed"] = self._window_mean(window["perturbed_loss"], steps)
                logs["perturbation_skipped"] = int(window["skipped"])
                if self.ascent.first_order:
                    logs["sharpness"] = self._window_mean(window["sharpness"], steps)
                if window["perturbed"]:
                    logs["perturbation_norm"] = self._window_mean(window["applied"], window["perturbed"])
            if window["cosine"]:
                logs["ascent_cosine"] = float(np.mean(window["cosine"]))
            logs["active_param_ratio"] = window["active"] / steps
            if self.selector is not None:
                logs["selected_arms"] = window["selected"] / steps
                logs["bandit_entropy"] = self.selector.entropy()
                self.history.close_window(self.state.global_step, self.selector.probabilities)
            if window["bandit_skipped"]:
                logs["bandit_skipped"] = window["bandit_skipped"]
            self._window = self._empty_window()
        super().log(logs, start_time)

    def _window_mean(self, total, steps):
        total = torch.as_tensor(total, device=self.args.device, dtype=torch.float32)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, "mean")
        return round(float(total) / steps, 6)

    def train(self, *args, **kwargs):
        """Every call starts the SAM state afresh, as the step count, schedule and log history restart: selector,
        lookback buffer, held selection, selection history and log window (a resume then restores them from the
        checkpoint; `model_init` rebuilds them from the new model). The base optimizer is stock's: a second call
        keeps its moments."""
        if self.state.global_step > 0:  # a run happened on this trainer: its state is the previous run's
            self._build_selection()
        try:
            return super().train(*args, **kwargs)
        finally:
            self._set_requires_grad(None)
            self._step_started = None
            if self.selector is not None and self.args.should_save:
                self.history.close_window(self.state.global_step, self.selector.probabilities)
                self.history.save(self.args.output_dir)

    def save_model(self, output_dir=None, _internal_call=False):
        """Stock save; a save to `args.output_dir` called by the user (not a checkpoint) also writes the model card
        there (`create_model_card`)."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and output_dir in (None, self.args.output_dir):
            self.create_model_card()

    def create_model_card(self, *args, **kwargs):
        """Stock model card (`output_dir/README.md`), plus how the model was trained: the SAM and selection options,
        the measured active-parameter ratio and most-selected blocks (`modelcard.method_section`), the tags `sam` and
        `slsam_hf` and the citation of SL-SAM and ZO-SAM."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            section = method_section(sam_options(self.args), self.history.state_dict())
            add_to_model_card(os.path.join(self.args.output_dir, "README.md"), section)

    def _hp_search_setup(self, trial):
        """Runs in `train()` after `model_init` rebuilt the model and a trial set its options."""
        super()._hp_search_setup(trial)
        if self.model_init is not None:
            self._build_selection()

    def _save_checkpoint(self, model, trial):
        """Stock checkpoint plus the SAM state. The lookback gradients follow FSDP2's state dict type: whole tensors
        (FULL_STATE_DICT, gathered on every process, written by the main one) or each process's shards
        (SHARDED_STATE_DICT, one file per process)."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if not self.args.save_only_model:
            sharded = (self.is_fsdp_enabled
                       and self.accelerator.state.fsdp_plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT)
            lookback = {name: g.to_local() if sharded else full(g) for name, g in self._lookback.items()}
            if sharded:
                save_lookback(folder, lookback, (self.args.process_index, self.args.world_size))
            if self.args.should_save:
                stateful = [name for name, p in self._trainable.items() if p in self.optimizer.state]
                save_sam_state(folder, [arm.name for arm in self.arms], self.selector, self.history,
                               {} if sharded else lookback, self._held, self._selection_options(), stateful)
        if self.selector is not None and self.args.should_save:
            self.history.save(self.args.output_dir, heatmap=False)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Stock loading, then the SAM state. Under FSDP2, torch.distributed.checkpoint refuses a trainable tensor
        without saved optimizer state (an arm never drawn before the checkpoint): such tensors are frozen while the
        optimizer state loads, and stay without state, as in the run that wrote it."""
        stateless = []
        if checkpoint is not None and self.is_fsdp_enabled:
            self._follow_sharded_parameters()
            with_state = optimizer_state_names(checkpoint)
            if with_state is not None:
                stateless = [p for name, p in self._trainable.items() if name not in with_state]
        for p in stateless:
            p.requires_grad_(False)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            for p in stateless:
                p.requires_grad_(True)
        if checkpoint is None:
            return
        if not has_sam_state(checkpoint):
            logger.warning(
                f"{checkpoint} has no SAM state (written by a stock Trainer?): resuming with a fresh selector "
                "and lookback buffer."
            )
            return
        shard = (self.args.process_index, self.args.world_size) if self.is_fsdp_enabled else None
        lookback, self._held = load_sam_state(checkpoint, [arm.name for arm in self.arms], self.selector,
                                              self.history, set(self._trainable), self._selection_options(), shard)
        self._lookback = {name: like(self._trainable[name], g) for name, g in lookback.items()}

    def _selection_options(self):
        """The options a checkpoint's selector state holds for: a resume must use the same."""
        options = {"layer_selection": self.args.layer_selection}
        if self.selector is not None:
            options["selection_budget"] = self.args.selection_budget
        return options


class _MicroBatch:
    """The trainer's answers to an ascent direction's questions about one micro-batch (`ascent.AscentSource`)."""

    def __init__(self, trainer, model, inputs, num_items_in_batch):
        self.trainer, self.model, self.inputs, self.num_items_in_batch = trainer, model, inputs, num_items_in_batch
        self.seed = derive_seed(trainer.args.seed, trainer.state.global_step, trainer._micro_step)
        self.clean_loss = None  # the train-mode loss at theta, when `gradient` computed it
        self._probe_inputs = None
        self._backup = None  # (params, their copy)

    def gradient(self, params):
        """The ascent gradient, on the leading sam_ascent_fraction of the rows (the clean loss only when on all)."""
        fraction = self.trainer.args.sam_ascent_fraction
        inputs = self.trainer._leading_rows(self.inputs, fraction)
        grads, loss = self.trainer._first_order(self.model, inputs, self.num_items_in_batch, params)
        self.clean_loss = loss if fraction == 1 else None
        return grads

    def loss(self):
        if self._probe_inputs is None:
            self._probe_inputs = self.trainer._leading_rows(self.inputs, self.trainer.args.zo_probe_fraction)
        return self.trainer._probe_loss(self.model, self._probe_inputs)

    def first_moment(self, params):
        optimizer = self.trainer.optimizer  # None before the first create_optimizer: no state yet
        return first_moment({} if optimizer is None else optimizer.state, params)

    def previous_gradient(self, params):
        return [self.trainer._lookback.get(self.trainer._names[p]) for p in params]

    def backup(self, params):
        """Taken once per micro-batch: the zero-order probes restore theta from it, then the update pass does."""
        if self._backup is None or self._backup[0] is not params:
            self._backup = (params, [p.detach().clone() for p in params])
        return self._backup[1]


class SAMTrainer(SAMTrainerMixin, Trainer):
    """Drop-in `transformers.Trainer` that trains with SL-SAM layer selection and (ZO-)SAM perturbation.

    Same constructor as `Trainer`; configure it with `SAMTrainingArguments`.
    """
