"""Dataclass schemas for every config section: the one place defaults and docs live.

They are registered in Hydra's ConfigStore (see :func:`register_configs`), and
``conf/config.yaml`` lists ``config_schema`` first in its defaults, so every YAML
group and command-line override is merged into these typed, struct-mode configs:
a misspelt key or a wrong type fails at compose time with a message naming the key.

YAML files under ``conf/`` only hold values that *differ* from these defaults.
Names follow TRL / verl where they have one (``beta``, ``kl_coef``, ``cliprange``...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class PathsConfig:
    #: repository / working root (defaults to Hydra's original cwd)
    root_dir: str = "."
    #: this run's directory (Hydra's run dir; set by the entry point)
    output_dir: str = "outputs/runs/manual"
    #: shared content-addressed stage cache; every run and sweep reuses it
    artifact_dir: str = "${paths.root_dir}/outputs/artifacts"


@dataclass
class CacheConfig:
    """How the shared artifact cache is used (not part of any stage's fingerprint)."""

    #: check a cached artifact's files before reuse: hash (size + SHA-256) | size | none
    verify: str = "hash"
    #: seconds to wait for another process building the same stage (null = as long as it takes)
    lock_timeout_s: Optional[float] = None


@dataclass
class TaskConfig:
    #: built-in task: ``lexicon`` (text, hidden gold reward), ``arithmetic`` (verifiable) or
    #: ``intransitive`` (cyclic gold preference: a game no reward can represent)
    name: str = "lexicon"
    #: seed of the task's data generators (separate from the training ``seed``)
    seed: int = 1234
    #: prompts for SFT demonstrations / preference pairs / held-out evaluation
    num_train_prompts: int = 2000
    num_pref_prompts: int = 2000
    num_eval_prompts: int = 128
    #: Bradley-Terry sharpness: P(a > b) = sigmoid(bt_beta * (gold(a) - gold(b)))
    bt_beta: float = 4.0
    #: probability of flipping a sampled preference label (synthetic annotator noise)
    label_noise: float = 0.0
    #: quality knob of the demonstration policy in [0, 1] (low leaves RL headroom)
    demo_quality: float = 0.3
    #: task-specific options, typed by the task's ``Options`` dataclass (composed from the
    #: ``task_options/<name>`` schema, so a misspelt option is an error naming the key)
    options: Any = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    #: module names to adapt; null = peft's default for the architecture
    target_modules: Optional[List[str]] = None


@dataclass
class ModelConfig:
    #: ``builtin``: build ``arch`` from scratch (or load ``name_or_path`` when set);
    #: ``pretrained`` (``model=pretrained``): ``name_or_path`` is required
    source: str = "builtin"
    #: hub id or local directory of a pretrained model; null = build ``arch`` from scratch
    name_or_path: Optional[str] = None
    #: built-in random-init architecture when name_or_path is null: ``gpt2`` or ``llama``
    arch: str = "gpt2"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    #: vocabulary size of the tokenizer trained on the task corpus (built-in models)
    vocab_size: int = 512
    #: context length (prompt + completion) for training and generation
    max_length: int = 64
    #: tokenizer to use instead of the model's own / the trained one (hub id or dir)
    tokenizer: Optional[str] = None
    #: Jinja chat template to install on the tokenizer (conversational data)
    chat_template: Optional[str] = None
    #: executing model code from the hub is off unless you trust it
    trust_remote_code: bool = False
    dropout: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    #: null = the task's built-in generator; else a local jsonl/json/parquet/csv file
    #: (or directory) or a Hugging Face Hub dataset name
    path: Optional[str] = None
    #: hub dataset config / subset name
    name: Optional[str] = None
    split: str = "train"
    #: auto | language_modeling | prompt_completion | preference | conversational
    format: str = "auto"
    #: rename user columns to canonical ones, e.g. {question: prompt, answer: completion}
    columns: Dict[str, str] = field(default_factory=dict)
    max_samples: Optional[int] = None
    #: fraction held out for validation metrics
    eval_fraction: float = 0.1
    #: a prompt longer than the model's budget: error (name its file:line) | drop | truncate_left
    on_long_prompt: str = "error"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    #: transformers scheduler name: linear | cosine | constant_with_warmup | ...
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05


@dataclass
class SFTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_epochs: int = 4
    #: -1 = run max_epochs
    max_steps: int = -1
    #: mask prompt tokens out of the loss (TRL's completion_only_loss)
    completion_only_loss: bool = True
    #: keep a Lightning checkpoint (last.ckpt) in the stage's work directory
    checkpoint: bool = True


@dataclass
class PairModelConfig:
    """Settings shared by the models trained on preference pairs (reward and preference models)."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    #: backbone: ``sft`` (start from the SFT stage's model, N+ recipe) or ``model``
    #: (build / load this section's ``model`` - e.g. a pretrained encoder - independently)
    init_from: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    #: IDS / N+ observe RMs overfit after the first epoch
    max_epochs: int = 1
    max_steps: int = -1
    checkpoint: bool = False


@dataclass
class RewardConfig(PairModelConfig):
    """The reward stage (kind ``reward``): a Bradley-Terry reward model or an ensemble."""

    #: Bradley-Terry margin: use the data's ``margin`` column when present
    use_margin: bool = True
    #: reward centering coefficient c * (r_w + r_l)^2 (Eisenstein et al.)
    center_rewards_coefficient: float = 0.0
    #: K members trained on bootstrap resamples (Coste et al. ensembles)
    ensemble_size: int = 1
    #: shift rewards so SFT demonstrations score 0 on average (N+ detail)
    normalize_to_sft: bool = True


@dataclass
class PreferenceModelConfig(PairModelConfig):
    """The pairwise preference model stage (kind ``preference_model``): P(a > b | x) read from
    ``prompt + a + eos + b + eos``, antisymmetric by construction (see pipeline/models/preference.py)."""

    #: a cycle needs more than one pass to be learnt
    max_epochs: int = 2
    #: tokens of prompt + both responses; null = the backbone's position limit
    #: (each response is cut to the same budget, so both orders hold the same tokens)
    max_length: Optional[int] = None
    #: equal-width confidence bins of the held-out expected calibration error (val/ece)
    calibration_bins: int = 10


@dataclass
class EvalConfig:
    #: sampling for policy evaluation
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    #: samples per held-out prompt
    num_samples: int = 2
    batch_size: int = 64
    #: completions written to the stage's examples.jsonl and printed
    num_examples: int = 4
    #: ensemble aggregation for the proxy reward: mean | wco | uwo
    reward_aggregation: str = "mean"
    #: also evaluate the random-init / pretrained base model for comparison
    include_base: bool = False
    #: win rates between every two evaluated policies under the gold preference (and, with a
    #: ``preference`` input, under the learned preference model)
    win_rates: bool = True
    #: beta of the regularised game whose exploitability is reported (tasks with a class game)
    exploitability_beta: float = 0.1
    #: evaluation data: null = the held-out part of the user data the inputs trained on (or the
    #: built-in task's held-out prompts and pairs); else a prompt file (policies are sampled on its
    #: prompts) or a preference file (also the reward / preference model accuracy on its pairs)
    data: DataConfig = field(default_factory=DataConfig)
    #: a user reward function "package.module:function" (called like ``rl.reward_fn``, with the
    #: prompt rows' columns) scoring every policy's samples as ``user_reward``
    reward_fn: Optional[str] = None


@dataclass
class AlgorithmConfig:
    """Online policy optimisation (``rl`` stages): one config schema, presets in conf/algorithm/
    (each composes ``algorithm_schema/rl``).

    Batch sizes, in one place (per rank; DDP multiplies by the world size):

    - ``rl.prompts_per_step`` = P prompts are sampled per rollout step;
    - ``num_generations`` = G completions per prompt, so a rollout batch holds
      B = P x G sequences (group estimators - grpo, dr_grpo, rloo, reinforce_pp_baseline -
      compare the G completions of a prompt and need G >= 2);
    - ``num_mini_batches`` = M: B must divide by M; each minibatch has B / M sequences;
    - ``ppo_epochs`` = E passes over the rollout batch, so E x M optimizer steps per rollout step.
    """

    #: preset label (ppo, grpo, rloo, remax, reinforce_pp)
    name: str = "ppo"
    #: advantage estimator: gae | grpo | dr_grpo | rloo | remax | reinforce_pp | reinforce_pp_baseline
    advantage_estimator: str = "gae"
    #: policy loss: ppo_clip | vanilla_pg
    policy_loss: str = "ppo_clip"
    #: token-mean | seq-mean-token-sum | seq-mean-token-mean
    loss_agg_mode: str = "token-mean"
    #: completions per prompt (G)
    num_generations: int = 1
    #: passes over each rollout batch (E)
    ppo_epochs: int = 4
    #: minibatches per pass (M)
    num_mini_batches: int = 1
    #: KL coefficient (beta); initial value for the adaptive controller
    kl_coef: float = 0.05
    #: k1 | k2 | k3
    kl_estimator: str = "k1"
    #: where the KL goes: ``reward`` (token-level penalty, PPO/RLOO) or ``loss`` (GRPO)
    kl_penalty: str = "reward"
    #: fixed | adaptive (Ziegler et al.)
    kl_controller: str = "fixed"
    kl_target: float = 6.0
    kl_horizon: int = 10000
    #: PPO ratio clip epsilon
    cliprange: float = 0.2
    #: value clip epsilon
    cliprange_value: float = 0.2
    #: value-loss weight
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    #: group normalisation divides by the group std (false = Dr. GRPO)
    norm_adv_by_std: bool = True
    #: whiten sequence scores over the batch before shaping
    whiten_rewards: bool = False
    #: clip sequence scores to [-x, x] (PPO-max); null = off
    reward_clip: Optional[float] = None
    #: subtracted from the score of responses that end without EOS (TRL semantics)
    missing_eos_penalty: Optional[float] = None
    #: rollout sampling (log-probs use the same temperature)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 24
    #: critic initialisation for gae: ``reward`` (from the reward model, N+) or ``policy``
    value_init: str = "reward"
    #: learning rate of the critic (null = policy lr)
    critic_lr: Optional[float] = None


@dataclass
class ScheduleEntry:
    """One change of a schedule: ``overrides`` (``key=value``) take effect at the start of rollout step ``step``."""

    step: int = 0
    overrides: List[str] = field(default_factory=list)


@dataclass
class RLConfig:
    """The online RL stage (kind ``rl``): the training loop shared by every algorithm."""

    #: reward_model (upstream reward stage) | gold (the task's hidden reward) | callable
    reward_source: str = "reward_model"
    #: ``module.path:function`` called as fn(prompts=, completions=, **dataset columns) -> list[float]
    reward_fn: Optional[str] = None
    #: ensemble aggregation for reward_model: mean | wco | uwo
    reward_aggregation: str = "mean"
    uwo_coef: float = 1.0
    #: prompts per rollout step per rank (P)
    prompts_per_step: int = 16
    #: rollout steps
    total_steps: int = 50
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, scheduler="constant_with_warmup",
                                                                   warmup_ratio=0.0))
    #: prompts: null path = the task's ``rl`` split; else a prompt-only file (``prompt`` column)
    data: DataConfig = field(default_factory=DataConfig)
    #: held-out evaluation (gold / proxy / KL) every N steps; 0 = off
    eval_every: int = 10
    eval_prompts: int = 64
    #: example completions written to completions.jsonl (and a W&B table) every N steps
    log_completions_every: int = 10
    num_completions_logged: int = 8
    #: train LoRA adapters on the SFT policy; the reference is the same model with
    #: adapters disabled (no second copy in memory)
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: hyperparameters that change during training, e.g. [{step: 20, overrides: [algorithm.kl_coef=0.1]}]
    #: (the keys of pipeline/modules/schedule.py SCHEDULABLE; population-based training writes these)
    schedule: List[ScheduleEntry] = field(default_factory=list)


@dataclass
class PreferenceLossOptions:
    """Options of the registered preference losses, shared by every stage that trains one (``dpo``,
    ``nlhf``): the one place their defaults live (names and defaults as TRL's ``DPOConfig`` /
    ``CPOConfig`` where TRL has them). Which loss reads which option is declared in
    pipeline/algorithms/preference_losses.py; a set option no chosen loss reads is an error."""

    #: one loss name or a list mixed with ``loss_weights`` (e.g. [sigmoid, sft] = RPO); see the README table
    loss_type: Any = "sigmoid"
    #: one weight per entry of ``loss_type``; null = all 1.0
    loss_weights: Optional[List[float]] = None
    #: ε: label-noise rate in [0, 0.5) (sigmoid = cDPO, robust, exo_pair, aot, aot_pair, simpo)
    label_smoothing: float = 0.0
    #: f-DPO score: reverse_kl (plain DPO) | forward_kl | js_divergence | alpha_divergence
    f_divergence_type: str = "reverse_kl"
    #: α of alpha_divergence (> 0)
    f_alpha_divergence_coef: float = 1.0
    #: τ of the DiscoPOP blend (discopop)
    discopop_tau: float = 0.05
    #: SimPO target margin γ (simpo)
    simpo_gamma: float = 0.5
    #: CPL conservative bias λ in (0, 1] (cpl)
    cpl_lambda: float = 0.5
    #: ignore the reference model (uniform reference) for losses that can (reference="optional")
    reference_free: bool = False
    #: adds rpo_alpha x the NLL of the chosen response (RPO); null = off
    rpo_alpha: Optional[float] = None


@dataclass
class NLHFAlgorithmConfig(PreferenceLossOptions):
    """Online preference optimisation (``nlhf`` stages): Nash-MD, Nash-MP, online IPO, EGPO,
    INPO and online / iterative DPO, presets in conf/algorithm/ (each composes
    ``algorithm_schema/nlhf``). One loop: prompts -> samples from the policy and its opponent
    -> P(y > y') from the judge -> a registered loss -> update."""

    #: preset label (nash_md, nash_mp, online_ipo, egpo, inpo, online_dpo)
    name: str = "nash_md"
    #: online objective: nash_md_pg | nash_mp_pg | online_ipo | inpo (the Nash losses of
    #: pipeline/algorithms/nash.py) | best_worst (the judge's best and worst of num_generations
    #: samples - or, for listwise losses, all of them ranked - trained with loss_type)
    loss: str = "nash_md_pg"
    #: plain (one gradient step per iteration) | extragradient (two half steps from the same
    #: weights, the second against the half-step policy: Nash-MP's mirror prox, EGPO)
    update_rule: str = "plain"
    #: KL-regularisation coefficient of the game (TRL ``beta``; INPO's tau; DPO's beta)
    beta: float = 0.1
    #: Nash-MD: the opponent samples from softmax((1 - a) * logits_pi + a * logits_ref) (TRL name;
    #: the geometric mixture pi^(1-eta*beta) pi_ref^(eta*beta) with a = eta * beta)
    mixture_coef: float = 0.5
    #: Nash-MP prox step (its anchor term weighs beta/eta; eta = 2 beta matches the contraction
    #: rate) / INPO's OMD step
    eta: float = 0.2
    #: gradient steps per half step (update_rule=extragradient); the anchor terms act from the 2nd on
    inner_steps: int = 1
    #: responses sampled from the policy per prompt (and as many opponent responses)
    num_generations: int = 2
    #: rollout sampling
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 24
    #: subtracted from the judge's logit of a response without EOS (TRL semantics for scores)
    missing_eos_penalty: Optional[float] = None


@dataclass
class NLHFConfig:
    """The online preference stage (kind ``nlhf``): the loop shared by every Nash method and
    online / iterative DPO, settings for the stage (the algorithm's are in ``algorithm.*``)."""

    #: who says P(y > y'): null = the stage's ``judge`` input (a reward model, through
    #: sigmoid(r - r'), or a pairwise preference model); gold_preference | gold_reward = the task's
    judge: Optional[str] = None
    #: ensemble aggregation when the judge is a reward model: mean | wco | uwo
    reward_aggregation: str = "mean"
    uwo_coef: float = 1.0
    #: prompts per iteration per rank
    prompts_per_step: int = 16
    #: rounds x steps_per_round iterations in all
    rounds: int = 40
    #: iterations per round: the round's starting policy pi_t is frozen and samples the round's
    #: responses (INPO, iterative DPO); 1 = fully online (pi_t is always the current policy)
    steps_per_round: int = 1
    #: the KL reference becomes the current policy every k rounds (k = 1: DNO-style iterative
    #: DPO); 0 = never (it stays the input policy)
    ref_update_every: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, scheduler="constant_with_warmup",
                                                                   warmup_ratio=0.0))
    #: prompts: null path = the task's ``rl`` split; else a prompt-only file (``prompt`` column)
    data: DataConfig = field(default_factory=DataConfig)
    #: held-out evaluation (gold reward, KL, gold win rate against the starting policy) every
    #: N iterations into curve.jsonl; 0 = off
    eval_every: int = 10
    eval_prompts: int = 64
    #: LoRA adapters on the input policy; the reference is the same model with adapters off
    #: (a copy is still made where a frozen model must sample: Nash-MD's mixture, anchors)
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: hyperparameters that change during training, per iteration, e.g. [{step: 20, overrides: [algorithm.beta=0.05]}]
    #: (the keys of pipeline/modules/schedule.py NLHF_SCHEDULABLE; population-based training writes these)
    schedule: List[ScheduleEntry] = field(default_factory=list)

@dataclass
class DPOConfig(PreferenceLossOptions):
    """Offline preference optimisation (kind ``dpo``): the DPO family of losses on preference pairs
    (the loss options, shared with the online preference stage, are :class:`PreferenceLossOptions`)."""

    #: preference pairs: null path = the task's preference pairs (``pref`` split); else a
    #: preference file (explicit / implicit prompt, conversational), as for ``reward.data``
    data: DataConfig = field(default_factory=DataConfig)
    #: lr for the tiny built-in models (TRL's 1e-6 / 5e-7 suit large pretrained models)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, scheduler="linear", warmup_ratio=0.1))
    #: preference pairs per optimizer step per rank (each pair is two sequences in one forward pass)
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_epochs: int = 2
    #: -1 = run max_epochs
    max_steps: int = -1
    #: pairs per forward pass for held-out metrics and precomputed reference log-probs
    eval_batch_size: int = 64
    #: β: temperature of the implicit reward (IPO's τ, ORPO's λ, CPL's α, SimPO's β)
    beta: float = 0.1
    #: subtract the data's per-pair ``margin`` column inside the loss (ODPO-style offset;
    #: sigmoid / robust); pairs without one get 0
    use_margin: bool = False
    #: compute the reference log-probs of every pair once before training and store them in the
    #: artifact store (a rerun that changes only loss settings reuses them); no reference forward
    #: pass per step and no reference model in memory while training
    precompute_ref_log_probs: bool = False
    #: train LoRA adapters on the input policy; the reference is the same model with adapters
    #: disabled (no second copy); the published policy has the adapters merged
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: keep a Lightning checkpoint (last.ckpt) in the stage's work directory
    checkpoint: bool = False


@dataclass
class StageSpec:
    #: unique name of the stage in this pipeline (used as input reference)
    name: str = MISSING
    #: stage kind from the stage registry: sft | reward | rl | evaluate | ...
    kind: str = MISSING
    #: role -> upstream stage name(s), e.g. {policy: sft} or {policies: [sft, ppo]}
    inputs: Dict[str, Any] = field(default_factory=dict)
    #: settings for this stage only, in command-line syntax: config-group choices and keys,
    #: e.g. [algorithm=grpo, algorithm.kl_coef=0.02]. Applied on top of the pipeline-wide
    #: config; keys given on the command line still apply to every stage (see README).
    overrides: List[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    #: label of the chain (for run names / grouping)
    name: str = "default"
    stages: List[StageSpec] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every training stage."""

    accelerator: str = "cpu"
    devices: Any = 1
    #: auto | ddp | ddp_spawn | fsdp | deepspeed_stage_2 ...
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 10
    #: validation passes per epoch (0 disables)
    val_check_interval: Optional[float] = None
    enable_progress_bar: bool = True
    deterministic: bool = False
    #: torch intra-op threads (null = torch default)
    num_threads: Optional[int] = None
    #: a training stage saves a checkpoint every N steps (optimizer steps; rollout steps / iterations
    #: for rl and nlhf) in ``<artifact_dir>/.tmp/<kind>-<fingerprint>.resume/``; rerunning a killed
    #: stage continues from it with the same result (see README, "Resuming"). 0 = no mid-stage checkpoints
    checkpoint_every_n_steps: int = 20


@dataclass
class WandbConfig:
    project: str = "rlhf-pipeline"
    entity: Optional[str] = None
    #: null = online when credentials are configured (WANDB_API_KEY / netrc), else offline
    mode: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    #: W&B group of the stage runs (null = the run directory's name; the tuner groups by study)
    group: Optional[str] = None


@dataclass
class LoggerConfig:
    #: Lightning loggers: any of csv, wandb, tensorboard (CSV is always added)
    backends: List[str] = field(default_factory=lambda: ["csv"])
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    preference_model: PreferenceModelConfig = field(default_factory=PreferenceModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: the algorithm preset (``algorithm=ppo``...): typed by the schema its option composes
    #: (``algorithm_schema/rl`` for online RL, ``algorithm_schema/nlhf`` for Nash methods and
    #: online DPO; other stage kinds register their own)
    algorithm: Any = None
    rl: RLConfig = field(default_factory=RLConfig)
    #: offline preference optimisation (``dpo`` stages: DPO, IPO, SimPO, f-DPO, ...)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    #: online preference optimisation (``nlhf`` stages: Nash-MD, Nash-MP, online IPO, EGPO, INPO, online DPO)
    nlhf: NLHFConfig = field(default_factory=NLHFConfig)
    #: training seed (model init, data order, sampling); tasks have their own seed
    seed: int = 0
    #: recompute every stage even when a cached artifact matches
    force: bool = False
    #: recompute only these stages (by name), e.g. [rl]
    force_stages: List[str] = field(default_factory=list)
    #: label shown in logs / W&B run names
    run_name: str = "${pipeline.name}"
    #: print a summary table at the end
    print_summary: bool = True
    #: settings for one stage given on the command line: ``stages.<stage>.<key>=<value>``
    #: (e.g. ``stages.ppo.algorithm.kl_coef=0.3``, or a group choice ``stages.ppo.algorithm=grpo``);
    #: applied to that stage only, after everything else
    stages: Dict[str, Any] = field(default_factory=dict)
    #: the overrides this config was composed from (recorded by the entry points and
    #: :func:`pipeline.config.compose`; stages with their own settings are composed on top of them)
    overrides: List[str] = field(default_factory=list)


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent): ``config_schema`` and, per
    built-in task, ``task_options/<task>`` (each ``conf/task/<task>.yaml`` composes its options from it)."""
    from hydra.core.config_store import ConfigStore

    from pipeline.tasks import TASKS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="algorithm_schema", name="rl", node=AlgorithmConfig)
    cs.store(group="algorithm_schema", name="nlhf", node=NLHFAlgorithmConfig)
    for name, task_cls in TASKS.items():
        cs.store(group="task_options", name=name, node=task_cls.Options)
