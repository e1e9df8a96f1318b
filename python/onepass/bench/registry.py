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
import pkgutil
from typing import Any, Callable, Optional

import torch

PASSES = ("fwd", "fwd+bwd")
#: upstream gradient rows (output k of a provider is weighted by row k % UPSTREAM_ROWS)
UPSTREAM_ROWS = 8

CORE_PROVIDERS = ("onepass", "naive")
#: peers: listed only on a CUDA device and only when importable
PEER_PROVIDERS = ("torch.compile(naive)", "liger", "cce", "pot", "trl")
#: peers that also run on the CPU (when importable)
CPU_PEERS = ("pot", "trl")


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One matrix product of a floor. layout "nt": A[m,k] @ B[n,k].T; "nn": A[m,k] @ B[k,n];
    "tn": A[k,m].T @ B[k,n]."""
    layout: str
    m: int
    n: int
    k: int


@dataclasses.dataclass(frozen=True)
class Floor:
    """What no implementation can beat on a GPU: a sum of measured GEMMs, or bytes over the measured
    copy bandwidth (each input read once, each output written once)."""
    gemms: tuple = ()
    bytes: int = 0
    label: str = ""


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
    floor: floor(shape, dtype, pass, variant) -> Floor or None (GPU only).
    sweep: the shape key plotted on the x axis.
    notes: {provider: text} shown with that provider's rows (e.g. "logp only, no entropy").
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
          passes=PASSES) -> list:
    """Every case of the selected families for ``device`` (default shapes; ``quick`` = tiny shapes)."""
    key = device_key(device, quick)
    fams = families()
    selected = list(fams) if not names else list(names)
    out = []
    for name in selected:
        fam = get_family(name)
        dt = dtype or fam.dtypes.get(key, "float32")
        for variant in fam.variants:
            for shape in fam.shapes.get(key, []):
                for p in fam.passes:
                    if p in passes:
                        out.append(Case(fam.name, tuple(sorted(variant.items())), tuple(shape.items()), dt, p))
    return out


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def peer_status() -> dict:
    """{peer: (available, reason)} for this machine (peers run on CUDA devices only, but CPU_PEERS)."""
    cuda = torch.cuda.is_available()
    st = {}
    for peer, module in (("torch.compile(naive)", None), ("liger", "liger_kernel"), ("cce", "cut_cross_entropy"),
                         ("pot", "ot"), ("trl", "trl")):
        if not cuda and peer not in CPU_PEERS:
            st[peer] = (False, "GPU only (no CUDA device)")
            continue
        if module is None:
            st[peer] = (hasattr(torch, "compile"), "" if hasattr(torch, "compile") else "torch.compile missing")
            continue
        try:
            importlib.import_module(module)
            st[peer] = (True, "")
        except Exception as exc:  # ImportError, or a broken install
            st[peer] = (False, f"{module} not importable ({type(exc).__name__})")
    return st


_COMPILED: dict = {}


def _compiled_naive(fam: Family):
    if fam.name not in _COMPILED:
        _COMPILED[fam.name] = torch.compile(fam.providers["naive"], dynamic=False)
    return _COMPILED[fam.name]


def providers_for(fam: Family, device: str, only=None) -> dict:
    """{provider: fn} runnable for ``fam`` on ``device`` (peers only on CUDA and when importable)."""
    out = {k: fam.providers[k] for k in CORE_PROVIDERS}
    if device.startswith("cuda"):
        st = peer_status()
        if st["torch.compile(naive)"][0]:
            out["torch.compile(naive)"] = lambda inputs, _f=fam, **kw: _compiled_naive(_f)(inputs, **kw)
        for peer in ("liger", "cce"):
            if peer in fam.providers and st[peer][0]:
                out[peer] = fam.providers[peer]
    for peer in CPU_PEERS:
        if peer in fam.providers and peer_status()[peer][0]:
            out[peer] = fam.providers[peer]
    if only:
        out = {k: v for k, v in out.items() if k in only}
    return out


def provider_fn(fam: Family, provider: str, device: str):
    fns = providers_for(fam, device)
    if provider not in fns:
        raise KeyError(f"provider {provider!r} is not available for {fam.name} on {device}")
    return fns[provider]


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
    dH = dZ @ W and dW = dZ.T @ h (the 4-GEMM floor); grad=False (a frozen model) = logits twice."""
    fwd = Gemm("nt", n, v, d)
    if pass_ == "fwd":
        return (fwd,)
    if not grad:
        return (fwd, fwd)
    return (fwd, fwd, Gemm("nn", n, d, v), Gemm("tn", v, d, n))


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
