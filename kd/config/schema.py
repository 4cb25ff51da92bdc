"""The config schema: typed dataclasses grouped by concern, each field's doc string under it
(docs/config.md's reference table is made from them), values checked in `__post_init__`; and the schema's
own introspection (every dotted key, the list-typed ones, the defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

from omegaconf import MISSING, OmegaConf

from kd.errors import ConfigError
from kd.loss.spec import DIVERGENCES


@dataclass
class TeacherConfig:
    name_or_path: str = MISSING
    """Hub id, local directory, or `builtin:<name>` (tiny models built locally, see kd/demo/builtin.py)."""
    dtype: str = "auto"
    """Weights dtype: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16."""
    attn_implementation: Optional[str] = None
    """Passed to from_pretrained (e.g. sdpa, flash_attention_2); None lets transformers choose."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub id for the teacher's view; None = the teacher's own."""
    zero3: bool = True
    """Under DeepSpeed, shard the teacher with ZeRO-3 for inference (partitioned across ranks,
    whatever stage the student uses). False replicates the whole teacher on every GPU."""
    offload: bool = False
    """With zero3: keep the teacher's parameter partitions in CPU memory (slower, for big teachers)."""
    cache: Optional[str] = None
    """Directory of a teacher-logit cache (`python -m kd.cache` writes it there): training then
    loads no teacher and distils from the cached top-k logits plus one tail bucket; a cache that
    does not match the data, tokenizer or length limits is refused. See kd/cache/."""

    def __post_init__(self):
        _choice("teacher.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.cache is not None and not str(self.cache).strip():
            raise ConfigError("teacher.cache must be a directory, or null for the live teacher")


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank r; 0 trains the whole student (full fine-tuning). With r > 0 the student is wrapped
    by peft and only the adapters (and student.lora.modules_to_save) are trained."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or name suffixes) that get adapters; all-linear = every linear layer of the
    decoder except the output layer. The lm_head cannot carry an adapter (the loss projects with
    its weight directly): name it in modules_to_save to train it fully."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. [lm_head] or [embed_tokens, lm_head]."""
    init_from: Optional[str] = None
    """A peft adapter directory to start from (its own rank, alpha and targets are used)."""

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError("student.lora.rank must be >= 0 (0 = full fine-tuning)")
        if self.init_from is None and self.rank > 0 and not self.target_modules:
            raise ConfigError("student.lora.target_modules is empty; name modules or use [all-linear]")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("student.lora.dropout must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or self.init_from is not None


@dataclass
class StudentConfig:
    name_or_path: str = MISSING
    """Hub id, local directory, or `builtin:<name>`. The student's tokenizer is the one used."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub id for the data (the student's view); None = the student's own.
    Set it when the two models share a vocabulary but their tokenizer classes differ (e.g. one
    adds a special token)."""
    dtype: str = "auto"
    """Weights dtype, as for the teacher. Trainable weights stay fp32 under mixed precision."""
    attn_implementation: Optional[str] = None
    """Passed to from_pretrained."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Parameter-efficient student (peft LoRA); see the student.lora.* keys."""

    def __post_init__(self):
        _choice("student.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Local .jsonl/.json/.parquet files or save_to_disk directories (a DatasetDict gives its
    train_split). Records: {system?, prompt, response}, {messages: [{role, content}]} or ShareGPT
    {conversations: [{from, value}]}."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files or directories (a DatasetDict gives its eval_split, default test); if
    empty, `eval_fraction` of the training records is held out."""
    dataset: Optional[str] = None
    """A `datasets` hub name, used when train_files is empty."""
    dataset_config: Optional[str] = None
    """The dataset's configuration name, if it has several."""
    train_split: str = "train"
    """Split of `dataset` used for training."""
    eval_split: Optional[str] = None
    """Split of `dataset` used for eval; None holds out `eval_fraction` of the training split."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename source columns to the schema's names, e.g. {system: system_prompt, prompt: question}
    or {messages: dialogue}."""
    targets: str = "all_assistant"
    """Which assistant turns are trained: all_assistant (every turn of a multi-turn conversation)
    or last (only the final one; earlier turns are prompt context)."""
    store: Optional[str] = "auto"
    """Where tokenised views are stored once and memory-mapped by every rank: auto
    ($KD_HOME/tokenised, default ~/.cache/kd), a directory, or off (tokenise in memory each start)."""
    eval_fraction: float = 0.05
    """Fraction of training records held out when no eval files/split are given (0 = no eval)."""
    max_length: int = 1024
    """Maximum tokens per view (prompt + response)."""
    min_prompt_tokens: int = 8
    """Left-truncation never cuts a prompt below this many tokens (the end of the question and
    the assistant header); the response is truncated instead, and dropped if nothing is left."""
    erase_strategy: str = "on"
    """Strategy-instruction erasure for the student view: on, off, or a probability p in [0, 1]
    of erasing per example (decided by a seeded per-example coin, stable across resumes)."""
    generic_system: Optional[str] = None
    """Replacement system message for the student when the instruction is erased; None drops the
    system message entirely."""
    chat_template: Optional[str] = None
    """chatml, llama2, a Jinja template or the path of a .jinja file (e.g. trl's
    chat_templates/*_training.jinja); None uses the tokenizer's own (required for base models
    whose tokenizer has none)."""
    shuffle: bool = True
    """Shuffle training examples each epoch (seeded by train.seed and the epoch)."""
    packing: bool = False
    """Concatenate each training micro-batch into one row per view (no padding; position ids
    restart per example so attention never crosses examples). Checked at start for each model's
    attention implementation; refused in one line where it would not isolate examples."""
    group_by_length: bool = False
    """Put examples of similar length in the same micro-batch (sorted within seeded mega-batches of
    50 global batches, whose order is shuffled): less padding, deterministic and resumable, but a
    different sequence of batches than plain shuffling."""
    num_proc: Optional[int] = None
    """Processes for tokenisation with datasets.map."""

    def __post_init__(self):
        p = self.erase_probability  # validates; YAML reads a bare `on` as true, so normalise
        self.erase_strategy = {1.0: "on", 0.0: "off"}.get(p, str(p))
        if self.max_length < 2:
            raise ConfigError("data.max_length must be at least 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("data.eval_fraction must be in [0, 1)")
        _choice("data.targets", self.targets, ("all_assistant", "last"))
        if self.store is False or str(self.store).lower() in ("off", "false", "none", "no", ""):
            self.store = "off"  # YAML reads a bare `off` as false
        _check("data.num_proc", self.num_proc is None or self.num_proc >= 1, ">= 1 (or null)")
        _check("data.min_prompt_tokens", self.min_prompt_tokens >= 0, ">= 0")

    @property
    def erase_probability(self) -> float:
        v = str(self.erase_strategy).strip().lower()
        if v in ("on", "true", "yes"):
            return 1.0
        if v in ("off", "false", "no"):
            return 0.0
        try:
            p = float(v)
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 1.0:
            raise ConfigError(
                f"data.erase_strategy must be on, off or a probability in [0, 1], got {self.erase_strategy!r}"
            )
        return p


@dataclass
class LossConfig:
    """total = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(p_teacher^T || p_student^T),
    both terms summed over response tokens and divided by the global response-token count of the
    optimizer step (all micro-batches of the accumulation window, all ranks)."""

    alpha: float = 0.5
    """Weight of the hard-label cross-entropy; 1 - alpha weighs the distillation term."""
    temperature: float = 1.0
    """Softmax temperature T applied to teacher and student logits in D; D is scaled by T^2."""
    divergence: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd."""
    beta: float = 0.5
    """JSD interpolation: 0 = forward KL, 1 = reverse KL."""
    skew: float = 0.1
    """Skew KL mixing weight lambda (0 = plain KL)."""
    implementation: str = "chunked"
    """chunked: lm_head projection + loss chunk by chunk, never a full [tokens, vocab] tensor (the
    default); dense: fp32 logits for all response positions at once (the reference)."""
    chunk_size: int = 1024
    """Rows per chunk for the chunked implementation."""

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("loss.alpha must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")
        _choice("loss.divergence", self.divergence, DIVERGENCES)
        _choice("loss.implementation", self.implementation, ("dense", "chunked"))
        _check("loss.chunk_size", self.chunk_size >= 1, ">= 1")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError("loss.beta must be in [0, 1]")
        if not 0.0 <= self.skew < 1.0:
            raise ConfigError("loss.skew must be in [0, 1)")


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD's lambda) with erasure: see kd/onpolicy.py."""

    fraction: float = 0.0
    """Share of training micro-batches whose last trained turn is answered by the current student
    (from its student view) and graded by the teacher (from the strategy view); 0 = off-policy only."""
    temperature: float = 1.0
    """Sampling temperature of the student's answers (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass of the student's answers."""
    max_new_tokens: int = 256
    """Token budget of an answer (also capped by data.max_length); answers cut by it are kept and counted."""
    divergence: str = "reverse_kl"
    """Divergence on student samples (the only term: they have no gold label). reverse_kl is
    mode-seeking, the choice of MiniLLM and GKD's best on-policy setting: on its own samples the
    student is pushed off what the teacher finds unlikely instead of spreading over all the teacher
    allows. loss.temperature, beta and skew apply."""
    weight: float = 1.0
    """Weight of the on-policy divergence (times T^2), against alpha * CE + (1 - alpha) * T^2 * D off-policy."""
    start_step: int = 0
    """The warm-start curriculum: optimizer steps before this one are off-policy only (a student
    that cannot yet end its turn learns nothing from its own answers); 0 = on-policy from the start."""
    ramp_steps: int = 0
    """After start_step the share of on-policy micro-batches rises linearly to `fraction` over this
    many steps (0 = at once); logged as train/onpolicy_lambda."""
    warn_cut_share: float = 0.5
    """Collapse guard: one warning when more than this share of the student's answers hit
    max_new_tokens in warn_cut_steps consecutive logged steps that generated."""
    warn_cut_steps: int = 5
    """Consecutive logged steps (of those that generated) over warn_cut_share before that warning; 0 = never warn."""

    def lam(self, step: int) -> float:
        """The scheduled share of on-policy micro-batches at optimizer step `step` (0-based)."""
        if self.fraction <= 0.0 or step < self.start_step:
            return 0.0
        if self.ramp_steps > 0:
            return self.fraction * min(1.0, (step - self.start_step + 1) / self.ramp_steps)
        return self.fraction

    def schedule(self) -> str:
        """The curriculum in words ('' for a constant lambda), as the features and objective lines say it."""
        return (f" from step {self.start_step + 1}" if self.start_step else "") + \
            (f", rising over {self.ramp_steps} steps" if self.ramp_steps else "")

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError("onpolicy.fraction must be in [0, 1]")
        if self.start_step < 0 or self.ramp_steps < 0 or self.warn_cut_steps < 0:
            raise ConfigError("onpolicy.start_step, onpolicy.ramp_steps and onpolicy.warn_cut_steps must be >= 0")
        if not 0.0 <= self.warn_cut_share <= 1.0:
            raise ConfigError("onpolicy.warn_cut_share must be in [0, 1]")
        if self.fraction == 0.0 and (self.start_step or self.ramp_steps):
            raise ConfigError("onpolicy.start_step / onpolicy.ramp_steps are set but onpolicy.fraction is 0: "
                              "no step would be on-policy; set onpolicy.fraction")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError("onpolicy.temperature must be >= 0 and onpolicy.top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.weight < 0:
            raise ConfigError("onpolicy.max_new_tokens must be >= 1 and onpolicy.weight >= 0")
        _choice("onpolicy.divergence", self.divergence, DIVERGENCES)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at train.max_steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    implementation: str = "auto"
    """AdamW kernel: auto (fused where torch has a fused kernel for the device, else foreach),
    fused, foreach (one multi-tensor call per group), or for_loop (torch's per-parameter loop)."""

    def __post_init__(self):
        _choice("optim.implementation", self.implementation, ("auto", "fused", "foreach", "for_loop"))
        # refused here, before any model loads, with the key (torch would say it much later, without)
        _check("optim.lr", self.lr > 0, "> 0")
        _check("optim.weight_decay", self.weight_decay >= 0, ">= 0")
        _check("optim.beta1", 0 <= self.beta1 < 1, "in [0, 1)")
        _check("optim.beta2", 0 <= self.beta2 < 1, "in [0, 1)")
        _check("optim.eps", self.eps > 0, "> 0")
        _check("optim.warmup_steps", self.warmup_steps >= 0, ">= 0")
        _check("optim.min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _check("optim.max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/kd"
    """Where config.yaml, metrics.jsonl, checkpoints/ and student/ are written."""
    max_steps: Optional[int] = None
    """Optimizer steps to run (100 when neither this nor train.epochs is set)."""
    epochs: Optional[float] = None
    """Passes over the training set instead of max_steps (set exactly one): the step count and the
    LR schedule's length follow from the data; each epoch is whole optimizer steps."""
    micro_batch_size: int = 4
    """Examples per micro-batch per process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the global batch is micro_batch * accum * processes."""
    seed: int = 0
    """Seeds model init order, shuffling, erasure coins and dropout."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, none on CPU), no, bf16 or fp16 (autocast; the loss is fp32 regardless)."""
    eval_every: int = 50
    """Evaluate on held-out data every this many steps (0 = only at the end)."""
    eval_max_batches: int = 0
    """Cap on eval micro-batches per evaluation (0 = the whole eval set)."""
    save_every: int = 50
    """Checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (older ones are deleted after a new one is complete)."""
    resume: str = "latest"
    """latest (resume from output_dir's latest checkpoint if any), a checkpoint path, or off."""
    export: str = "full"
    """full (or true): the final student as save_pretrained weights + tokenizer in
    <output_dir>/student/ (a LoRA student merged into full weights, loadable without peft);
    adapter: a LoRA student's peft adapter only; off (or false): no export."""
    resume_changes: str = "refuse"
    """refuse: resuming with a config that changes the trajectory (data, lengths, batch, seed,
    models, loss, optimizer, schedule, world size) stops with the changed keys listed; allow: every
    change takes effect (an lr change rebuilds the schedule) and is logged. train.max_steps may
    always grow: the schedule keeps its recorded length unless changes are allowed."""
    on_nonfinite: str = "stop"
    """stop: a non-finite teacher output, loss or gradient norm ends the run before the step with
    one line naming the step and the culprit (the last good checkpoint is kept); skip: that
    optimizer step is skipped, counted and logged (not under DeepSpeed, whose engine steps inside
    backward)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: stop after this many non-finite steps in a row."""

    def __post_init__(self):
        self.export = {"true": "full", "on": "full", "false": "off", "no": "off", "none": "off"}.get(
            str(self.export).lower(), str(self.export))  # YAML reads bare true/false/off as booleans
        _choice("train.export", self.export, ("full", "adapter", "off"))
        _choice("train.resume_changes", self.resume_changes, ("refuse", "allow"))
        _choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        if self.max_skipped_steps < 1:
            raise ConfigError("train.max_skipped_steps must be >= 1")
        if str(self.mixed_precision).lower() in ("false", "off"):  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        _choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("set exactly one of train.max_steps and train.epochs (the other to null)")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 100
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError("train.epochs must be > 0")
        for k in ("max_steps", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1")
        for k in ("eval_every", "eval_max_batches", "save_every", "keep_checkpoints"):
            _check(f"train.{k}", getattr(self, k) >= 0, ">= 0")


@dataclass
class LogConfig:
    tracker: str = "none"
    """wandb or none. WANDB_MODE=offline works without a server."""
    project: str = "kd"
    """W&B project."""
    run_name: Optional[str] = None
    """W&B run name (default: W&B's)."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    log_every: int = 1
    """Log train/* metrics every this many optimizer steps."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""
    samples: int = 0
    """At each evaluation, greedy-decode the student's answers to the first N eval examples (their
    student view, last trained turn) and log prompt, reference and generation: a W&B Table
    eval/samples and <output_dir>/samples.jsonl. 0 = off."""
    sample_max_new_tokens: int = 128
    """Token budget of each logged sample generation."""

    def __post_init__(self):
        _choice("log.tracker", self.tracker, ("wandb", "none"))
        _check("log.log_every", self.log_every >= 1, ">= 1")
        if self.samples < 0 or self.sample_max_new_tokens < 1:
            raise ConfigError("log.samples must be >= 0 and log.sample_max_new_tokens >= 1")


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.onpolicy.fraction > 0 and self.teacher.cache:
            raise ConfigError("onpolicy.fraction > 0 needs the live teacher: teacher.cache holds the teacher's "
                              "outputs on the dataset's responses only, not on the student's own answers")
        if self.train.export == "adapter" and not self.student.lora.enabled:
            raise ConfigError("train.export=adapter needs a LoRA student (student.lora.rank > 0); use full or off")


def _check(key: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}")


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _leaves(cls=Config, prefix: str = ""):
    """(dotted key, dataclass, field name) for every leaf of the schema, nested groups walked."""
    for f in fields(cls):
        typ = f.default_factory if f.default_factory is not MISSING and is_dataclass(f.default_factory) else None
        if typ is not None:
            yield from _leaves(typ, prefix + f.name + ".")
        else:
            yield prefix + f.name, cls, f.name


def _list_keys() -> list[str]:
    return [key for key, cls, name in _leaves()
            if str(next(f.type for f in fields(cls) if f.name == name)).startswith("list")]


def all_keys() -> list[str]:
    """Every dotted key of the config schema, e.g. ['teacher.name_or_path', ..., 'student.lora.rank']."""
    return [key for key, _, _ in _leaves()]


def flat_dict_defaults() -> dict[str, str]:
    c = OmegaConf.structured(Config)
    out = {}
    for key in all_keys():
        parent, _, leaf = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(c, parent), leaf):
            out[key] = "(required)"
            continue
        node = OmegaConf.select(c, key)
        out[key] = repr(node if not OmegaConf.is_config(node) else OmegaConf.to_container(node))
    return out
