"""The benchmark registry: op families, their shapes, providers and floors, expanded into cases.

A *family* (``Family``) describes one op: how to build its inputs for a shape, the callables of each
provider, the default shapes per device, optional variants (e.g. the divergence kind) and, for the GPU,
its floor.  ``cases(...)`` expands the families found in the ``onepass.bench.cases_*`` modules into
``Case`` objects: family x variant x shape x dtype x pass.  Providers are attached at run time
(``providers_for``), because peers are optional.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import pkgutil
from typing import Any, Callable, Optional

import torch

PASSES = ("fwd", "fwd+bwd")
#: upstream gradient rows (output k of a provider is weighted by row k % UPSTREAM_ROWS)
UPSTREAM_ROWS = 8

CORE_PROVIDERS = ("onepass", "naive")
#: the CPU floor of the fused-linear families: their GEMMs alone (torch.mm), timed in the same rounds
FLOOR_PROVIDER = "floor"


@dataclasses.dataclass(frozen=True)
class Peer:
    """An optional peer provider: the module that must be importable, the devices it runs on, whether its
    first call compiles (torch.compile / inductor; warmed up at the real shape, skipped by --quick), and the
    passes it is measured in."""
    module: Optional[str]
    devices: tuple = ("cpu", "cuda")
    compiles: bool = False
    passes: tuple = PASSES


#: the peers, in table order.  "torch.compile(naive)" is derived from a family's "naive" provider; the others
#: are entries of a family's ``providers`` under the same key.
PEERS = {
    "torch.compile(naive)": Peer(None, compiles=True),
    "trl": Peer("trl"),                                          # selective_log_softmax_and_entropy
    # liger_kernel.chunked_loss (torch + compile) computes the gradients inside its forward: training only
    "liger-chunked": Peer("liger_kernel", compiles=True, passes=("fwd+bwd",)),
    "liger": Peer("liger_kernel", devices=("cuda",)),            # Liger's Triton ops
    "cce": Peer("cut_cross_entropy", devices=("cuda",)),
    "pot": Peer("ot"),
}
PEER_PROVIDERS = tuple(PEERS)
COMPILED_NAIVE = "torch.compile(naive)"


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One matrix product of a floor. layout "nt": A[m,k] @ B[n,k].T; "nn": A[m,k] @ B[k,n];
    "tn": A[k,m].T @ B[k,n]."""
    layout: str
    m: int
    n: int
    k: int
    recompute: bool = False     # a second logits GEMM of the GPU backward (not in the CPU floor)


@dataclasses.dataclass(frozen=True)
class Floor:
    """What no implementation can beat: a sum of measured GEMMs, or (GPU only) bytes over the measured
    copy bandwidth (each input read once, each output written once).  On the CPU only GEMM floors are
    measured, without the recompute GEMMs (``cpu_gemms``), as the "floor" provider of the same rounds."""
    gemms: tuple = ()
    bytes: int = 0
    label: str = ""

    @property
    def cpu_gemms(self) -> tuple:
        return tuple(g for g in self.gemms if not g.recompute)


@dataclasses.dataclass
class Family:
    """One op family.

    name: registry key (``--families``); op: the public function benchmarked (table column "op").
    make_inputs(shape, dtype, device, generator) -> dict of tensors (floats created as plain leaves).
    providers: {"onepass": fn, "naive": fn, optional "liger"/"cce": fn}; fn(inputs, **variant) -> a tensor,
        a tuple of tensors or a dict of tensors.  "torch.compile(naive)" is derived from "naive" on GPU.
    shapes: {"cpu": [...], "cuda": [...], "quick": [...]}; each shape a dict of ints (must hold "N").
    dtypes: default dtype per device key ("cpu", "cuda", "quick").
    grad_inputs: names of the inputs that require grad in the "fwd+bwd" pass.
    variants: list of keyword dicts passed to every provider (one case each), e.g. [{"kind": "jsd"}].
    floor: floor(shape, dtype, pass, variant) -> Floor or None (GPU: GEMMs or bytes; CPU: GEMMs only).
    sweep: the shape key plotted on the x axis (``--full``).
    notes: {provider: text} shown under the table (e.g. "logp only, no entropy").
    default: {"cpu": shape, "cuda": shape}: the one representative shape of the default run (``--full`` runs
        ``shapes``); without it the default run takes the first shape of ``shapes`` for the device.
    compile_default: the passes in which the default CPU run includes "torch.compile(naive)" (compiling costs
        10-25 s per case on two cores); ``--full`` and CUDA include it in every pass.
    """
    name: str
    op: str
    make_inputs: Callable[..., dict]
    providers: dict
    shapes: dict
    grad_inputs: tuple
    dtypes: dict = dataclasses.field(default_factory=lambda: {"cpu": "float32", "quick": "float32",
                                                              "cuda": "bfloat16"})
    variants: list = dataclasses.field(default_factory=lambda: [{}])
    floor: Optional[Callable[..., Optional[Floor]]] = None
    passes: tuple = PASSES
    sweep: str = "V"
    notes: dict = dataclasses.field(default_factory=dict)
    order: int = 100          # position in the default listing (then by name)
    default: dict = dataclasses.field(default_factory=dict)
    compile_default: tuple = ()

    def shapes_for(self, key: str, full: bool) -> list:
        """Shapes of device key "cpu" / "cuda" / "quick": the sweep (``full`` or quick) or the one default."""
        sweep = self.shapes.get(key, [])
        if full or key == "quick":
            return list(sweep)
        if key in self.default:
            return [self.default[key]]
        return sweep[:1]

    def rows(self, shape: dict) -> int:
        if "N" in shape:
            return int(shape["N"])
        return int(shape["G"]) if "G" in shape else int(shape["B"] * shape["T"])


def family(name: str, *, op: str, make_inputs, providers: dict, shapes: dict, grad_inputs, **kw) -> Family:
    """The helper every ``cases_<family>.py`` uses: ``FAMILIES = [family("x", op=..., ...)]``."""
    for key in ("onepass", "naive"):
        if key not in providers:
            raise ValueError(f"family {name!r}: providers must include {key!r}")
    return Family(name=name, op=op, make_inputs=make_inputs, providers=dict(providers), shapes=dict(shapes),
                  grad_inputs=tuple(grad_inputs), **kw)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    variant: tuple        # sorted (key, value) pairs
    shape: tuple          # (key, value) pairs in the family's order
    dtype: str
    pass_: str

    @property
    def variant_dict(self) -> dict:
        return dict(self.variant)

    @property
    def shape_dict(self) -> dict:
        return dict(self.shape)

    @property
    def op_label(self) -> str:
        fam = get_family(self.family)
        if not self.variant:
            return fam.op
        return f"{fam.op}[{','.join(str(v) for _, v in self.variant)}]"

    @property
    def shape_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape)

    @property
    def id(self) -> str:
        return f"{self.family}|{self.op_label}|{self.shape_label}|{self.dtype}|{self.pass_}"

    def to_json(self) -> dict:
        return {"family": self.family, "variant": self.variant_dict, "shape": self.shape_dict,
                "dtype": self.dtype, "pass": self.pass_}

    @staticmethod
    def from_json(d: dict) -> "Case":
        return Case(d["family"], tuple(sorted(d["variant"].items())), tuple(d["shape"].items()), d["dtype"],
                    d["pass"])


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def families() -> dict:
    """{name: Family} from every ``onepass.bench.cases_*`` module (their ``FAMILIES`` lists)."""
    import onepass.bench as pkg

    out: dict = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("cases_"):
            continue
        mod = importlib.import_module(f"onepass.bench.{info.name}")
        for fam in getattr(mod, "FAMILIES", []):
            if fam.name in out:
                raise ValueError(f"benchmark family {fam.name!r} defined twice")
            out[fam.name] = fam
    return dict(sorted(out.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise KeyError(f"unknown benchmark family {name!r}; known: {sorted(families())}") from None


def device_key(device: str, quick: bool) -> str:
    return "quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")


def cases(device: str = "cpu", *, quick: bool = False, names=None, dtype: Optional[str] = None,
          passes=PASSES, full: bool = True) -> list:
    """Every case of the selected families for ``device``: the sweep of ``shapes`` (``full``, the default of
    this function and of the pytest suites), the one representative shape (``full=False``, the CLI default),
    or the tiny shapes (``quick``)."""
    key = device_key(device, quick)
    fams = families()
    selected = list(fams) if not names else list(names)
    out = []
    for name in selected:
        fam = get_family(name)
        dt = dtype or fam.dtypes.get(key, "float32")
        for variant in fam.variants:
            for shape in fam.shapes_for(key, full):
                for p in fam.passes:
                    if p in passes:
                        out.append(Case(fam.name, tuple(sorted(variant.items())), tuple(shape.items()), dt, p))
    return out


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def peer_status(device: str = "cpu") -> dict:
    """{peer: (available, reason)} on ``device`` ("cpu" or "cuda...").  Importability is probed with
    ``importlib.util.find_spec`` (some peers take 10+ s to import); a broken install shows as an error row."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    st = {}
    for name, peer in PEERS.items():
        if kind not in peer.devices:
            st[name] = (False, "GPU only")
        elif peer.module is None:
            ok = hasattr(torch, "compile")
            st[name] = (ok, "" if ok else "torch.compile missing")
        elif importlib.util.find_spec(peer.module) is None:
            st[name] = (False, f"{peer.module} not installed (pip install -e \".[peers]\")")
        else:
            st[name] = (True, "")
    return st


_COMPILED: dict = {}


def _compiled_naive(fam: Family):
    if fam.name not in _COMPILED:
        _COMPILED[fam.name] = torch.compile(fam.providers["naive"], dynamic=False)
    return _COMPILED[fam.name]


def has_cpu_floor(fam: Family) -> bool:
    """Whether the family has a GEMM floor (the fused-linear families): then "floor" is a CPU provider."""
    if fam.floor is None:
        return False
    shape = (fam.shapes.get("quick") or fam.shapes.get("cpu") or [{}])[0]
    try:
        fl = fam.floor(shape, "float32", fam.passes[0], fam.variants[0])
    except Exception:
        return False
    return bool(fl is not None and fl.cpu_gemms)


def providers_for(fam: Family, device: str, only=None, *, quick: bool = False, full: bool = True) -> dict:
    """{provider: fn} runnable for ``fam`` on ``device``: onepass, naive, the installed peers that run on the
    device (``quick`` drops the peers that compile; the default CPU run, ``full=False``, compiles the naive code
    only for families with ``compile_default``), and on the CPU the GEMM "floor" of fused-linear families.
    The floor's fn is None: ``measure.Call`` builds it from ``fam.floor``."""
    out = {k: fam.providers[k] for k in CORE_PROVIDERS}
    cuda = device.startswith("cuda")
    st = peer_status("cuda" if cuda else "cpu")
    for name, peer in PEERS.items():
        if not st[name][0] or (quick and peer.compiles):
            continue
        if name == "torch.compile(naive)":
            if cuda or full or fam.compile_default:
                out[name] = lambda inputs, _f=fam, **kw: _compiled_naive(_f)(inputs, **kw)
        elif name in fam.providers:
            out[name] = fam.providers[name]
    if not cuda and has_cpu_floor(fam):
        out[FLOOR_PROVIDER] = None
    if only:
        out = {k: v for k, v in out.items() if k in only}
    return out


def provider_fn(fam: Family, provider: str, device: str):
    fns = providers_for(fam, device)
    if provider not in fns:
        raise KeyError(f"provider {provider!r} is not available for {fam.name} on {device}")
    return fns[provider]


def compiles(provider: str) -> bool:
    peer = PEERS.get(provider)
    return bool(peer and peer.compiles)


def runs_in(provider: str, pass_: str, fam: Optional[Family] = None, *, default_cpu: bool = False) -> bool:
    """Whether ``provider`` is measured in ``pass_``: a peer may be limited to some passes, and in the default CPU
    run (``default_cpu``) "torch.compile(naive)" only runs in the passes of ``fam.compile_default``."""
    peer = PEERS.get(provider)
    if peer is None:
        return True
    if default_cpu and fam is not None and provider == COMPILED_NAIVE and pass_ not in fam.compile_default:
        return False
    return pass_ in peer.passes


# ------------------------------------------------------------------------------------------------
# Helpers for family modules
# ------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def randn(shape, dtype: str, device: str, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random normal tensor created in fp32 on the device then cast (never zeros: METHOD.md)."""
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        x.mul_(scale)
    return x.to(torch_dtype(dtype)) if torch_dtype(dtype) != torch.float32 else x


def targets(n: int, v: int, device: str, gen: torch.Generator, ignore_frac: float = 0.05) -> torch.Tensor:
    """Random int64 targets in [0, V) with a few ignore_index (-100) positions."""
    t = torch.randint(0, v, (n,), generator=gen, device=device)
    if ignore_frac > 0:
        drop = torch.rand((n,), generator=gen, device=device) < ignore_frac
        t = torch.where(drop, torch.full_like(t, -100), t)
    return t


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def linear_gemms(n: int, d: int, v: int, pass_: str, *, grad: bool = True) -> tuple:
    """The GEMM floor of one LM head: fwd = logits h@W.T; fwd+bwd (grad=True) = logits, their recompute,
    dH = dZ @ W and dW = dZ.T @ h (the GPU 4-GEMM floor; the CPU floor drops the recompute: 3 GEMMs);
    grad=False (a frozen model) = logits (+ their recompute on the GPU)."""
    fwd = Gemm("nt", n, v, d)
    if pass_ == "fwd":
        return (fwd,)
    again = Gemm("nt", n, v, d, recompute=True)
    if not grad:
        return (fwd, again)
    return (fwd, again, Gemm("nn", n, d, v), Gemm("tn", v, d, n))


# ------------------------------------------------------------------------------------------------
# The onepass backend used by the "onepass" provider (CLI --backend; "auto" by default)
# ------------------------------------------------------------------------------------------------
_ONEPASS_BACKEND = ["auto"]


def set_onepass_backend(name: str) -> None:
    _ONEPASS_BACKEND[0] = name


def onepass_backend() -> str:
    return _ONEPASS_BACKEND[0]


# Default shapes shared by the vocabulary families ---------------------------------------------------
CPU_VOCABS = (8000, 32000)
CUDA_VOCABS = (32000, 65536, 151936)
QUICK_VOCABS = (256, 512)
