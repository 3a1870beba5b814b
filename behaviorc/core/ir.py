"""The checked spec: the one canonical form every later stage reads.

The checker (`behaviorc.lang.check`) is the only producer. Everything here is already
validated: names resolve, values are in range, data files are loaded (their content
hashes kept so cache keys change when a file does). Later stages never re-validate the
spec; they may still fail on the world (a model folder, a server) with a BehaviorError
that points at the `loc` kept on each node.

Layer numbers are 0-based decoder-layer indices; a steering vector at layer L is read
from, and added to, the residual stream at the output of decoder layer L.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from behaviorc.core.diagnostics import Location
from behaviorc.core.merge_methods import (DEFAULT_EPS, DEFAULT_EPSILON, DEFAULT_GAMMA,
                                          DEFAULT_MAX_ITER, DEFAULT_TOL, MergeMethod)
from behaviorc.core.vocabulary import (ChatRole, ContextMode, Device, DType, ExternalKind,
                                       FinalNormReading, LrSchedule, ModelSourceKind,
                                       SteerPositions,
                                       ObjectiveName, OptimizerName, Orientation, ReadPosition,
                                       ScoreKind, SteerMethod)

# The parameter groups a `targets` line may name; the architecture adapter maps them.
PARAMETER_GROUPS = (
    "gdn.gates", "gdn.proj", "gdn.conv", "gdn.out", "gdn.norm",
    "attn.q", "attn.kv", "attn.o", "attn.norm",
    "mlp", "embed", "head", "norm",
)


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataFile(Node):
    """A data file the spec named; its hash makes cache keys follow its content."""

    # absolute; left out of dumps, so of cache keys: a moved project keeps its keys
    path: str = Field(exclude=True)
    sha256: str
    loc: Location | None = Field(default=None, exclude=True)


class Pair(Node):
    """A steering or eval contrast: the same prompt, a wanted and an unwanted completion."""

    prompt: str
    positive: str
    negative: str


class ChatMessage(Node):
    role: ChatRole
    content: str


class Example(Node):
    """A training example: plain `context` + `response`, or a chat whose last assistant
    turn is the response (rendered with the tokenizer's chat template at train time)."""

    context: str = ""
    response: str = ""
    messages: tuple[ChatMessage, ...] = ()


class ModelDecl(Node):
    name: str
    source: str  # built-in name, a local folder (absolute), or a hub id
    kind: ModelSourceKind
    dtype: DType = "float32"
    device: Device = "auto"
    # the chat template's thinking mode (`enable_thinking`) wherever prompts become
    # tokens; off by default: behavior data are replies, not reasoning
    thinking: bool = False
    num_layers: int | None = None  # known for built-ins and readable folders
    fingerprint: str = ""  # changes when the model's files do (cache keys follow it)
    loc: Location | None = Field(default=None, exclude=True)


class Steer(Node):
    layers: tuple[int, ...] | Literal["auto"]
    method: SteerMethod = "mean_diff"
    # measured on smollm2-135m: 4 degrades replies (README, defaults); auto: chosen by
    # verification inside the budget
    strength: float | Literal["auto"] = 2.0
    read: ReadPosition = "mean"
    orient: Orientation = "mean"
    final_norm: FinalNormReading = "before"
    positions: SteerPositions = "all"  # the positions steering adds to
    pairs: tuple[Pair, ...]
    sources: tuple[DataFile, ...] = ()
    sweep: tuple[float, ...] = ()  # strengths for the verification sweep; empty: none
    nll_budget: float = 0.10  # the general NLL's relative rise a strength may cost
    repetition_budget: float = 0.10  # the samples' repeated-3-gram share's rise it may cost
    loc: Location | None = Field(default=None, exclude=True)


class Optimizer(Node):
    name: OptimizerName = "apollo"
    rank: int = 64
    refresh: int = 200
    limiter: float = 1.01
    scale: float | None = None  # None: auto, alpha = sqrt(n / r)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


class Mix(Node):
    """General data mixed into training so the model does not forget."""

    ratio: float  # 0..1, the share of training sequences drawn from `texts`
    texts: tuple[str, ...]
    source: DataFile | None = None
    # sft: next-token loss on the texts; kl: the base model's distribution on them
    # (an anchor to what the model was, not to the texts' own tokens)
    anchor: ObjectiveName = "sft"
    loc: Location | None = Field(default=None, exclude=True)


class Objective(Node):
    """What the student learns from the teacher's samples. sft: their tokens; kl: the
    teacher's next-token distribution at every position of them (its `top_k` tokens,
    the rest lumped into one), at `temperature`, and with weight `plain` the same on the
    plain model's own replies, where the teacher says what it would not have said."""

    # kl by default: measured on smollm2-135m it keeps more of the steered gain at 3 of
    # the demo's 4 candidate layers than sft, and the general NLL barely moves (README, "Defaults")
    name: ObjectiveName = "kl"
    top_k: int = 64  # 0: the whole vocabulary
    temperature: float = 1.0
    plain: float = 1.0
    # With a steered teacher: the weight of its distribution on general texts (built in,
    # behaviorc.train.general_texts), where the steering shows beside any prompt; 0: off.
    # Left out of dumps while off, so the cache keys of builds from before it stay.
    general: float = Field(default=0.0, exclude_if=lambda weight: weight == 0.0)
    # n > 0: in the teacher's distribution over a reply, each token that would repeat an
    # n-gram of the reply so far gets probability 0 (the rest renormalized), and the
    # teacher's looping samples are taught rather than dropped, so a student of a teacher
    # that loops learns how it goes on instead; 0: off. Left out of dumps while off, as
    # `general`.
    no_repeat: int = Field(default=0, exclude_if=lambda n: n == 0)


class Distill(Node):
    """Make a teacher's behavior permanent: sample the teacher (the behavior's steering,
    a system prompt, or both), keep the best samples, train the plain model on them."""

    prompts: tuple[str, ...]
    steering: bool = True  # the teacher is steered by the behavior's steering
    system: str | None = None  # the teacher's system prompt; the student sees none
    objective: Objective = Objective()
    source: DataFile | None = None
    samples: int = 4
    keep: int = 1  # best samples kept per prompt, by the behavior's margin
    temperature: float = 0.7
    max_tokens: int = 32
    match_activations: float = 0.0  # weight of the activation-matching loss; 0: off
    loc: Location | None = Field(default=None, exclude=True)


class Train(Node):
    examples: tuple[Example, ...] = ()
    sources: tuple[DataFile, ...] = ()
    distill: Distill | None = None
    mix: Mix | None = None
    # Defaults measured on smollm2-135m, where they distil a steered tone in a few CPU
    # minutes (README, "Defaults").
    lr: float = 1e-4
    steps: int = 30
    batch: int = 4
    warmup: int = 0
    schedule: LrSchedule = "cosine"
    clip: float = 1.0
    context: ContextMode = "frozen"
    targets: tuple[str, ...] = ("gdn.gates", "gdn.proj", "attn.q", "mlp")
    optimizer: Optimizer = Optimizer()
    seed: int = 0
    loc: Location | None = Field(default=None, exclude=True)


class Expectation(Node):
    metric: str  # a report metric name, e.g. margin_after
    op: Literal[">", ">=", "<", "<="]
    value: float
    loc: Location | None = Field(default=None, exclude=True)


class Judge(Node):
    """An OpenAI-compatible server that rates each reply 0-100 against `rubric`."""

    url: str
    model: str
    rubric: str
    guided: bool = True  # ask with vLLM's structured outputs (a choice of "0".."100")
    # How the server is reached, not what it rates: outside plans and content keys.
    timeout: float | None = Field(default=None, exclude=True)  # s per rating; else 60
    loc: Location | None = Field(default=None, exclude=True)


class Score(Node):
    """How a reply's behavior is scored (0..1; at least 0.5 shows the behavior)."""

    kind: ScoreKind
    pattern: str | None = None  # markers: a regular expression
    words: tuple[str, ...] = ()  # markers: whole words
    judge: Judge | None = None
    loc: Location | None = Field(default=None, exclude=True)


class Eval(Node):
    pairs: tuple[Pair, ...] = ()
    sources: tuple[DataFile, ...] = ()
    general: tuple[str, ...] = ()  # texts for general NLL
    expect: tuple[Expectation, ...] = ()
    # The reply table (with `score`): held-out prompts (empty: the held-out pairs'),
    # answered by the base, prompted (`system`), steered and trained models.
    prompts: tuple[str, ...] = ()
    system: str | None = None  # the prompting baseline's system prompt
    score: Score | None = None
    samples: int = 2  # sampled replies per prompt beside the greedy one
    max_tokens: int = 40  # tokens per reply
    loc: Location | None = Field(default=None, exclude=True)


class External(Node):
    """A behavior trained elsewhere: a fine-tuned model folder or a task-vector file."""

    kind: ExternalKind
    path: str  # absolute
    fingerprint: str = ""  # content hash of the file, or of the folder's config and weights
    loc: Location | None = Field(default=None, exclude=True)


class Behavior(Node):
    name: str
    model: str  # a ModelDecl name
    steer: Steer | None = None
    train: Train | None = None
    eval: Eval | None = None
    external: External | None = None
    loc: Location | None = Field(default=None, exclude=True)


class Term(Node):
    behavior: str
    weight: float
    # The term's own sparsifying settings (`merge ... { term NAME { density 0.3 } }`,
    # mergekit's per-model parameters); None: the merge's.
    density: float | None = None
    epsilon: float | None = None
    gamma: float | None = None


class Merge(Node):
    """A composition's merge method and settings (behaviorc.core.merge_methods names the
    methods and what each takes; `dare` is read as `dare_linear`)."""

    method: MergeMethod = "task_arithmetic"
    density: float = 1.0
    lambda_: float = 1.0
    normalize: bool | None = None  # None: the method's default (mergekit's)
    rescale: bool | None = None  # None: the method's default (mergekit's)
    epsilon: float = DEFAULT_EPSILON  # della
    gamma: float = DEFAULT_GAMMA  # breadcrumbs
    seed: int = 0
    t: float | None = None  # slerp (required there)
    flatten: bool = True  # nuslerp
    row_wise: bool = False  # nuslerp
    filter_wise: bool = False  # model_stock
    max_iter: int = DEFAULT_MAX_ITER  # karcher
    tol: float = DEFAULT_TOL  # karcher
    eps: float = DEFAULT_EPS  # multislerp
    groups: tuple[str, ...] = ()  # empty: every parameter
    loc: Location | None = Field(default=None, exclude=True)


class Compose(Node):
    """A named combination. The expression is linear, so its canonical form is a list of
    (behavior, weight) terms; `expression` keeps the canonical text for provenance."""

    name: str
    model: str
    terms: tuple[Term, ...]
    expression: str
    merge: Merge = Merge()
    loc: Location | None = Field(default=None, exclude=True)


class LoraForm(Node):
    """`as lora`: the target's weight change served as a LoRA adapter named after it,
    which requests pick by name, instead of pushed into the served weights. At most
    `rank` per matrix, or the fewest singular values keeping `energy` of each matrix's
    delta; neither: compose.lora.DEFAULT_RANK."""

    rank: int | None = None
    energy: float | None = None


class Deploy(Node):
    target: str  # a behavior or compose name
    urls: tuple[str, ...] | Literal["auto"]
    live: bool = True
    steering: bool = False  # serve with the target's steering vectors on
    # register the target's vectors (at its strength) under its name on the servers, for
    # the requests that ask for them with vllm_xargs {"steer": "NAME:STRENGTH"}
    named: bool = False
    handoff: bool = False  # lower served steering as training moves it into weights
    push_every: int = 0  # training steps between live pushes; 0: only the final weights
    lora: LoraForm | None = None  # served as an adapter (`as lora`), not pushed
    # How the servers are reached, not what they get: outside plans and content keys.
    api_key: str | None = Field(default=None, exclude=True, repr=False)  # else BEHAVIORC_API_KEY
    timeout: float | None = Field(default=None, exclude=True)  # s per call; else the default
    loc: Location | None = Field(default=None, exclude=True)


class Spec(Node):
    path: str
    sha256: str  # of the spec text and every imported file
    models: tuple[ModelDecl, ...]
    behaviors: tuple[Behavior, ...] = ()
    compositions: tuple[Compose, ...] = ()
    deploys: tuple[Deploy, ...] = ()

    def model(self, name: str) -> ModelDecl:
        return next(m for m in self.models if m.name == name)

    def behavior(self, name: str) -> Behavior:
        return next(b for b in self.behaviors if b.name == name)
