"""The names the command line offers as choices, as plain tuples: parsing a command and printing
its help import no torch. tests/cli/test_cli_help.py checks each against the registry or constant it
names (pyvae.parts, pyvae.data, pyvae.models, pyvae.train, pyvae.infer.ais)."""

PRIORS = ("flow", "laplace", "learned_normal", "mog", "normal", "student_t", "vamp")
LIKELIHOODS = (
    "bernoulli",
    "beta",
    "continuous_bernoulli",
    "discretized_logistic",
    "laplace",
    "normal",
    "normal_learned",
)
GUIDES = ("iaf", "lowrank", "normal")
NETS = ("mlp", "conv", "resnet")
ACTIVATIONS = ("relu", "softplus", "elu", "tanh", "leaky_relu", "gelu", "gated")
ELBOS = ("auto", "trace", "meanfield", "iwae", "enum")
LR_SCHEDULES = ("none", "iwae", "plateau", "cosine")
DEVICES = ("auto", "cpu", "cuda")
BINARIZE_MODES = ("none", "static", "dynamic")
#: the built-in data sets (pyvae.data.datasets.SPLITS)
DATASETS = (
    "binarized_mnist",
    "mnist",
    "fashion_mnist",
    "digits",
    "photos",
    "cifar10",
    "cifar100",
    "svhn",
)
MODELS = ("vae", "hvae", "cvae", "m2")
AIS_SCHEDULES = ("sigmoid", "linear")
AIS_STARTS = ("guide", "prior")
#: a run folder's checkpoints: best.pt (the best validation epoch) and checkpoint.pt (the last)
CHECKPOINTS = ("best", "last")
TRACKERS = ("none", "mlflow")
#: pyvae.compiled.COMPILE_CHOICES
COMPILE = ("auto", "on", "off")
