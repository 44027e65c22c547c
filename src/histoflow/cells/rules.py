"""Rule-based phenotypes: an ordered table of steps evaluated over marker positivity.

A rule table turns the boolean positivity layer written by :func:`histoflow.cells.gate` into one class
per cell. It is a short, ordered list of steps of three kinds::

    name: immune-basic
    aliases: {PanCK: [PanKeratin, Pan-Keratin], CD3: [CD3e, CD3d]}   # table name -> names in panels
    steps:
      - {group: T, when: "CD3"}                          # a named set of cells
      - {group: helper_T, when: "T and CD4 and not CD8"}
      - {exclude: "T and CD20"}                          # conflicting cells: class "excluded"
      - {assign: helper T, when: "helper_T"}             # a final class
      - {assign: T cell, when: "T"}
    default: unassigned                                  # cells no step decided
    excluded: excluded                                   # the class of excluded cells

Semantics
---------
* ``when`` (and the expression of ``exclude``) is a boolean expression over marker names and names of
  groups, with ``and``, ``or``, ``not`` and parentheses (``not`` binds tighter than ``and``, ``and``
  tighter than ``or``). A marker is true where the cell is positive for it. A name with spaces or
  other characters is quoted: ``"'NaK ATPase' and not CD45"``. Expressions are parsed by a small
  recursive-descent parser here, never by ``eval``.
* ``group`` steps define sets of cells; a group is the same for every cell whatever earlier steps
  decided, and may be used by any later step. A group must be defined before it is used, once.
* ``exclude`` and ``assign`` steps are *decisive*: they take the cells that match and that no earlier
  decisive step has taken. So the first decisive step that matches a cell decides its class, and
  the order of the table is its priority (put exclusions before assignments, and specific classes
  before general ones). Cells no step takes get ``default``.
* Marker names are matched to the channels of a panel through ``aliases`` and then loosely (case,
  spaces, hyphens and MIBI mass tags like ``" (171)"`` are ignored), so one table serves panels
  that spell channels differently.

Everything that can be checked is checked before anything is evaluated: syntax (at construction),
duplicate groups, groups used before their definition, circular group definitions (at construction),
and unknown markers (in :meth:`RuleTable.validate`, run by :meth:`RuleTable.apply`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from histoflow.cells.gating import CellsError, normalize_name, resolve_channel

__all__ = ["RuleTable", "Step", "RuleError", "ExpressionError", "parse_expression", "expression_names",
           "load_preset", "list_presets", "phenotype_colours"]

#: colours of the phenotypes, in the order of their classes (most distinct first); cells without one are grey
PHENOTYPE_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                     (70, 240, 240), (240, 50, 230), (250, 190, 212), (170, 255, 195), (220, 190, 255),
                     (255, 250, 200), (170, 110, 40), (210, 245, 60), (0, 128, 128), (128, 0, 0)]
GREYS = {"excluded": (70, 70, 70), "unassigned": (140, 140, 140)}


def phenotype_colours(classes) -> dict:
    """``{class: (r, g, b)}``: the classes in their order (a rule table's, as the categories of ``histoflow
    phenotype``'s column) take :data:`PHENOTYPE_PALETTE` in turn, ``excluded`` and ``unassigned`` two greys. The
    same class has the same colour on every slide phenotyped with one table, in the picture and in QuPath."""
    classes = [str(c) for c in classes]
    real = [c for c in classes if c not in GREYS]
    colour = {c: PHENOTYPE_PALETTE[i % len(PHENOTYPE_PALETTE)] for i, c in enumerate(real)}
    colour.update({c: GREYS[c] for c in classes if c in GREYS})
    return colour

MAX_EXPRESSION_CHARS = 4000
MAX_DEPTH = 64
MAX_STEPS = 10_000
MAX_TABLE_BYTES = 1 << 20
KEYWORDS = ("and", "or", "not")
STEP_KINDS = ("group", "exclude", "assign")


class RuleError(CellsError):
    """A rule table is invalid: bad structure, unknown marker, duplicate or circular groups."""


class ExpressionError(RuleError):
    """A rule expression is not valid syntax."""


# ----------------------------------------------------------------------------------------------------------
# expressions: tokenizer + recursive-descent parser (no eval anywhere)
# ----------------------------------------------------------------------------------------------------------
# AST nodes are tuples: ("name", str) | ("not", node) | ("and", (node, ...)) | ("or", (node, ...))

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<lpar>\()
  | (?P<rpar>\))
  | (?P<quoted>'[^'\n]*'|"[^"\n]*")
  | (?P<word>[A-Za-z0-9_](?:[A-Za-z0-9_.\-/]*[A-Za-z0-9_])?)
""", re.VERBOSE)


def _tokenize(text: str):
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(f"unexpected character {text[pos]!r} at position {pos} in {text!r}")
        kind = m.lastgroup
        if kind == "quoted":
            name = m.group()[1:-1].strip()
            if not name:
                raise ExpressionError(f"empty quoted name at position {pos} in {text!r}")
            tokens.append(("name", name, pos))
        elif kind == "word":
            word = m.group()
            tokens.append((word.lower(), word, pos) if word.lower() in KEYWORDS else ("name", word, pos))
        elif kind in ("lpar", "rpar"):
            tokens.append((kind, m.group(), pos))
        pos = m.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def _peek(self):
        return self.tokens[self.i]

    def _take(self):
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _fail(self, expected: str):
        kind, value, pos = self._peek()
        found = "the end" if kind == "end" else repr(value)
        raise ExpressionError(f"expected {expected} at position {pos} in {self.text!r}, found {found}")

    def parse(self):
        node = self._or(0)
        if self._peek()[0] != "end":
            self._fail("'and', 'or' or the end of the expression")
        return node

    def _or(self, depth):
        items = [self._and(depth)]
        while self._peek()[0] == "or":
            self._take()
            items.append(self._and(depth))
        return items[0] if len(items) == 1 else ("or", tuple(items))

    def _and(self, depth):
        items = [self._not(depth)]
        while self._peek()[0] == "and":
            self._take()
            items.append(self._not(depth))
        return items[0] if len(items) == 1 else ("and", tuple(items))

    def _not(self, depth):
        if depth > MAX_DEPTH:
            raise ExpressionError(f"expression nested deeper than {MAX_DEPTH} levels: {self.text[:80]!r}...")
        if self._peek()[0] == "not":
            self._take()
            return ("not", self._not(depth + 1))
        return self._atom(depth)

    def _atom(self, depth):
        kind = self._peek()[0]
        if kind == "name":
            return ("name", self._take()[1])
        if kind == "lpar":
            self._take()
            node = self._or(depth + 1)
            if self._peek()[0] != "rpar":
                self._fail("')'")
            self._take()
            return node
        self._fail("a marker or group name, 'not' or '('")


def parse_expression(text: str):
    """Parse a rule expression into a small tuple tree; raise :class:`ExpressionError` on bad syntax.

    >>> parse_expression("T and not (CD4 or CD8)")
    ('and', (('name', 'T'), ('not', ('or', (('name', 'CD4'), ('name', 'CD8'))))))
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be a string, not {type(text).__name__}: {text!r}")
    if not text.strip():
        raise ExpressionError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    return _Parser(text).parse()


def expression_names(node) -> list[str]:
    """The names an expression tree refers to, in order of first appearance."""
    out: list[str] = []

    def walk(n):
        if n[0] == "name":
            if n[1] not in out:
                out.append(n[1])
        elif n[0] == "not":
            walk(n[1])
        else:
            for c in n[1]:
                walk(c)

    walk(node)
    return out


def _evaluate(node, lookup):
    kind = node[0]
    if kind == "name":
        return lookup(node[1])
    if kind == "not":
        return ~_evaluate(node[1], lookup)
    parts = [_evaluate(c, lookup) for c in node[1]]
    out = parts[0].copy()
    for p in parts[1:]:
        if kind == "and":
            out &= p
        else:
            out |= p
    return out


# ----------------------------------------------------------------------------------------------------------
# steps and tables
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a rule table.

    ``kind`` is ``"group"`` (``name`` is the group), ``"assign"`` (``name`` is the class) or
    ``"exclude"`` (``name`` is ``None``); ``when`` is the expression text; ``index`` is 1-based.
    """
    kind: str
    name: str | None
    when: str
    index: int = 0
    note: str | None = None
    tree: tuple = field(default=(), repr=False, compare=False)

    def describe(self) -> str:
        if self.kind == "group":
            return f"{self.index}: group {self.name} = {self.when}"
        if self.kind == "exclude":
            return f"{self.index}: exclude {self.when}"
        return f"{self.index}: assign {self.name!r} when {self.when}"

    def to_dict(self) -> dict:
        if self.kind == "exclude":
            d = {"exclude": self.when}
        else:
            d = {self.kind: self.name, "when": self.when}
        if self.note:
            d["note"] = self.note
        return d


def _step_from(obj, index: int) -> Step:
    where = f"step {index}"
    if isinstance(obj, Step):
        d = obj.to_dict()
    elif isinstance(obj, Mapping):
        d = dict(obj)
    else:
        raise RuleError(f"{where}: a step is a mapping like {{group: NAME, when: EXPR}}, "
                        f"{{exclude: EXPR}} or {{assign: CLASS, when: EXPR}}, not {obj!r}")
    kinds = [k for k in STEP_KINDS if k in d]
    if len(kinds) != 1:
        raise RuleError(f"{where}: needs exactly one of 'group', 'exclude', 'assign'; got keys {sorted(map(str, d))}")
    kind = kinds[0]
    allowed = {kind, "note"} | ({"when"} if kind != "exclude" else set())
    extra = sorted(str(k) for k in d if k not in allowed)
    if extra:
        raise RuleError(f"{where} ({kind}): unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")
    note = d.get("note")
    if note is not None and not isinstance(note, str):
        raise RuleError(f"{where}: 'note' must be text")
    if kind == "exclude":
        name, when = None, d["exclude"]
    else:
        name, when = d[kind], d.get("when")
        if not isinstance(name, str) or not name.strip():
            raise RuleError(f"{where}: the {kind} name must be non-empty text, not {name!r}")
        name = name.strip()
        if when is None:
            raise RuleError(f"{where} ({kind} {name!r}): missing 'when'")
    if not isinstance(when, str):
        raise RuleError(f"{where}: the expression must be text, not {when!r}")
    try:
        tree = parse_expression(when)
    except ExpressionError as e:
        raise ExpressionError(f"{where}: {e}") from None
    if kind == "group" and (name.lower() in KEYWORDS or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name)):
        raise RuleError(f"{where}: group name {name!r} must be a single word (letters, digits, _ . -), "
                        "not a keyword, so that later expressions can use it")
    return Step(kind=kind, name=name, when=when, index=index, note=note, tree=tree)


def _as_aliases(aliases) -> dict[str, list[str]]:
    if aliases is None:
        return {}
    if not isinstance(aliases, Mapping):
        raise RuleError(f"aliases must be a mapping {{marker: [names in panels]}}, not {type(aliases).__name__}")
    out = {}
    for k, v in aliases.items():
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise RuleError(f"aliases of {k!r} must be a name or a list of names, not {v!r}")
        out[str(k)] = [str(n) for n in names]
    return out


class RuleTable:
    """An ordered table of phenotype rules (see the module documentation for the format).

    Parameters
    ----------
    steps : sequence of mappings or :class:`Step`
        ``{group: NAME, when: EXPR}``, ``{exclude: EXPR}`` or ``{assign: CLASS, when: EXPR}``, each
        optionally with a ``note``.
    aliases : mapping, optional
        ``{marker used in the table: [channel names in panels]}``.
    default : str
        Class of cells no decisive step takes.
    excluded : str
        Class of cells taken by an ``exclude`` step.
    name, description, source : str, optional
        For people (``source`` is where the table comes from).

    Raises
    ------
    RuleError
        Bad structure, duplicate group, group used before its definition, circular groups.
    ExpressionError
        An expression is not valid syntax.
    """

    def __init__(self, steps, aliases=None, default: str = "unassigned", excluded: str = "excluded",
                 name: str | None = None, description: str | None = None, source: str | None = None):
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
            raise RuleError("steps must be a list of steps")
        if not steps:
            raise RuleError("a rule table needs at least one step")
        if len(steps) > MAX_STEPS:
            raise RuleError(f"a rule table has at most {MAX_STEPS} steps")
        for label, what in ((default, "default"), (excluded, "excluded")):
            if not isinstance(label, str) or not label.strip():
                raise RuleError(f"{what!r} must be a non-empty class name, not {label!r}")
        self.steps: list[Step] = [_step_from(s, i + 1) for i, s in enumerate(steps)]
        self.aliases = _as_aliases(aliases)
        self.default = default
        self.excluded = excluded
        self.name = name
        self.description = description
        self.source = source
        self._check_groups()

    # -- structure ---------------------------------------------------------------------------------------

    @property
    def groups(self) -> list[str]:
        """Group names, in table order."""
        return [s.name for s in self.steps if s.kind == "group"]

    @property
    def classes(self) -> list[str]:
        """Final classes in table order, then ``excluded`` (if any exclude step) and ``default``."""
        out = []
        for s in self.steps:
            if s.kind == "assign" and s.name not in out:
                out.append(s.name)
        for extra in ([self.excluded] if any(s.kind == "exclude" for s in self.steps) else []) + [self.default]:
            if extra not in out:
                out.append(extra)
        return out

    @property
    def markers(self) -> list[str]:
        """Marker names the table uses (every name that is not a group), in order of first use."""
        groups = set(self.groups)
        out = []
        for s in self.steps:
            for n in expression_names(s.tree):
                if n not in groups and n not in out:
                    out.append(n)
        return out

    def _check_groups(self):
        defined: dict[str, int] = {}
        for s in self.steps:
            if s.kind == "group":
                if s.name in defined:
                    raise RuleError(f"step {s.index}: group {s.name!r} is already defined at step {defined[s.name]}")
                defined[s.name] = s.index
        # circular definitions first: they are the root cause of any forward reference they imply
        deps = {s.name: [n for n in expression_names(s.tree) if n in defined]
                for s in self.steps if s.kind == "group"}
        state: dict[str, int] = {}                       # 1 = on the current path, 2 = done

        def visit(g, path):
            state[g] = 1
            for d in deps[g]:
                if state.get(d) == 1:
                    cycle = path[path.index(d):] + [d]
                    where = [str(defined[c]) for c in cycle[:-1]]
                    where = f"step {where[0]}" if len(where) == 1 else f"steps {', '.join(where)}"
                    raise RuleError(f"circular group definition: {' -> '.join(cycle)} ({where})")
                if d not in state:
                    visit(d, path + [d])
            state[g] = 2

        for g in deps:
            if g not in state:
                visit(g, [g])
        for s in self.steps:
            for n in expression_names(s.tree):
                if n in defined and defined[n] >= s.index:
                    raise RuleError(f"step {s.index}: group {n!r} is used before it is defined (at step "
                                    f"{defined[n]}); move its definition earlier")

    # -- panels ------------------------------------------------------------------------------------------

    def resolve(self, marker: str, channels: Sequence[str]) -> str | None:
        """The channel of ``channels`` that ``marker`` means (through aliases, then loose matching)."""
        aliases = list(self.aliases.get(marker, []))
        for key, names in self.aliases.items():        # aliases keyed by a differently spelled marker
            if key != marker and normalize_name(key) == normalize_name(marker):
                aliases += names
        return resolve_channel(marker, channels, aliases)

    def validate(self, channels: Sequence[str]) -> dict[str, str]:
        """Check the table against a panel; return ``{marker: channel}``.

        Raises :class:`RuleError` naming the first step that uses a marker no channel matches (with the
        available channels), or a group whose name is also a channel name.
        """
        channels = [str(c) for c in channels]
        groups = set(self.groups)
        for s in self.steps:
            if s.kind != "group":
                continue
            try:
                clash = resolve_channel(s.name, channels)
            except CellsError:
                clash = "several channels"
            if clash is not None:
                raise RuleError(f"step {s.index}: group {s.name!r} has the same name as channel {clash!r}; "
                                "rename the group")
        mapping: dict[str, str] = {}
        for s in self.steps:
            for n in expression_names(s.tree):
                if n in groups or n in mapping:
                    continue
                try:
                    ch = self.resolve(n, channels)
                except CellsError as e:
                    raise RuleError(f"step {s.index} ({s.when!r}): {e}") from None
                if ch is None:
                    alias = self.aliases.get(n)
                    also = f" (nor its aliases {', '.join(alias)})" if alias else ""
                    raise RuleError(f"step {s.index} ({s.when!r}): unknown marker {n!r}{also}; it is neither "
                                    f"a channel nor a group defined earlier. Channels: {', '.join(channels)}")
                mapping[n] = ch
        return mapping

    # -- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, positive: np.ndarray, channels: Sequence[str], return_groups: bool = False):
        """Evaluate the table on a boolean matrix (cells x channels).

        Returns ``(labels, steps)``: an object array of class names and an int array with the 1-based
        index of the step that decided each cell (0 for ``default``); with ``return_groups`` also
        ``{group: boolean array}``.
        """
        channels = [str(c) for c in channels]
        positive = np.asarray(positive)
        if positive.ndim != 2 or positive.shape[1] != len(channels):
            raise RuleError(f"positivity has shape {positive.shape}, expected (cells, {len(channels)})")
        if positive.dtype != bool:
            if not np.isin(positive, (0, 1)).all():
                raise RuleError("the positivity layer must be boolean (or 0/1)")
            positive = positive.astype(bool)
        mapping = self.validate(channels)
        col = {c: i for i, c in enumerate(channels)}
        n = positive.shape[0]
        groups: dict[str, np.ndarray] = {}

        def lookup(name):
            if name in groups:
                return groups[name]
            return positive[:, col[mapping[name]]]

        labels = np.full(n, self.default, dtype=object)
        decided_by = np.zeros(n, dtype=np.int32)
        open_ = np.ones(n, dtype=bool)
        for s in self.steps:
            mask = _evaluate(s.tree, lookup)
            if s.kind == "group":
                groups[s.name] = mask
                continue
            take = mask & open_
            labels[take] = self.excluded if s.kind == "exclude" else s.name
            decided_by[take] = s.index
            open_ &= ~take
        if return_groups:
            return labels, decided_by, groups
        return labels, decided_by

    def apply(self, adata, positive_layer: str = "positive", key: str = "phenotype") -> dict[str, int]:
        """Classify every cell of ``adata``.

        Writes ``adata.obs[key]`` (categorical, categories in table order), ``adata.obs[key + "_step"]``
        (the 1-based step that decided the cell; 0 = ``default``) and ``adata.uns[key + "_rules"]`` (the
        table's name, steps and the marker -> channel mapping used). Returns ``{class: count}``.

        The table is validated against ``adata.var_names`` first; when ``adata.uns["gating"]`` describes
        the layer, a marker whose channel was not gated is an error too (it would never be positive).
        """
        import pandas as pd

        if positive_layer not in adata.layers:
            raise RuleError(f"the cell table has no layer {positive_layer!r}; run histoflow.cells.gate(adata) "
                            f"first (layers: {sorted(adata.layers.keys())})")
        channels = [str(c) for c in adata.var_names]
        mapping = self.validate(channels)
        gating = adata.uns.get("gating") if positive_layer == "positive" else None
        if isinstance(gating, Mapping) and "channels" in gating:
            gated = {str(c) for c in gating["channels"]}
            for marker, ch in mapping.items():
                if ch not in gated:
                    step = next(s.index for s in self.steps if marker in expression_names(s.tree))
                    raise RuleError(f"step {step}: marker {marker!r} is channel {ch!r}, which was not gated; "
                                    f"gate it (gate(adata, channels=[..., {ch!r}]))")
        layer = adata.layers[positive_layer]
        try:
            import scipy.sparse as sp
            if sp.issparse(layer):
                layer = layer.toarray()
        except ImportError:                      # pragma: no cover
            pass
        labels, decided_by = self.evaluate(np.asarray(layer), channels)
        cats = self.classes
        adata.obs[key] = pd.Categorical(labels, categories=cats)
        adata.obs[key + "_step"] = decided_by
        adata.uns[key + "_rules"] = {
            "name": self.name or "",
            "source": self.source or "",
            # two parallel lists, not a mapping: a marker named with a "/" would become an HDF5 group path
            "markers": [str(k) for k in mapping], "channels": [str(v) for v in mapping.values()],
            "steps": [s.describe() for s in self.steps],
            "default": self.default,
            "excluded": self.excluded,
        }
        counts = pd.Series(labels).value_counts()
        return {c: int(counts.get(c, 0)) for c in cats}

    # -- files -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "rule table") -> "RuleTable":
        """Build a table from its mapping form (what the YAML file holds)."""
        if not isinstance(d, Mapping):
            raise RuleError(f"{where}: expected a mapping with 'steps', got {type(d).__name__}")
        known = {"name", "description", "source", "aliases", "steps", "default", "excluded"}
        extra = sorted(str(k) for k in d if k not in known)
        if extra:
            raise RuleError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(known))}")
        if "steps" not in d:
            raise RuleError(f"{where}: no 'steps'")
        try:
            return cls(d["steps"], aliases=d.get("aliases"), default=d.get("default", "unassigned"),
                       excluded=d.get("excluded", "excluded"), name=d.get("name"),
                       description=d.get("description"), source=d.get("source"))
        except RuleError as e:
            raise type(e)(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path) -> "RuleTable":
        """Read a table from a YAML file (``yaml.safe_load`` with YAML 1.2's numbers, ``1e-3`` a float; at most 1 MiB)."""
        import yaml

        path = os.fspath(path)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise RuleError(f"{path}: cannot read the rule table ({e.strerror or e})") from None
        if size > MAX_TABLE_BYTES:
            raise RuleError(f"{path}: a rule table is at most {MAX_TABLE_BYTES} bytes, this file has {size}")
        if os.path.isdir(path):
            raise RuleError(f"{path}: is a folder, not a rule table (a YAML file, or the name of a built-in preset)")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise RuleError(f"{path}: not a text (UTF-8) file: {e.reason} at byte {e.start}") from None
        except OSError as e:
            raise RuleError(f"{path}: cannot read the rule table ({e.strerror or e})") from None
        try:
            from ..utils import yaml_load

            d = yaml_load(text)
        except yaml.YAMLError as e:
            raise RuleError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_dict(d, where=path)

    def to_dict(self) -> dict:
        d = {}
        for k in ("name", "description", "source"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.aliases:
            d["aliases"] = {k: list(v) for k, v in self.aliases.items()}
        d["steps"] = [s.to_dict() for s in self.steps]
        d["default"] = self.default
        d["excluded"] = self.excluded
        return d

    def to_yaml(self, path) -> None:
        """Write the table as YAML (to a temporary name first, then renamed)."""
        from ..utils import yaml_dump

        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            yaml_dump(self.to_dict(), f, sort_keys=False, allow_unicode=True)
        os.replace(tmp, path)

    def __len__(self):
        return len(self.steps)

    def __repr__(self):
        return (f"RuleTable(name={self.name!r}, steps={len(self.steps)}, groups={len(self.groups)}, "
                f"classes={len(self.classes)})")


# ----------------------------------------------------------------------------------------------------------
# presets shipped with histoflow
# ----------------------------------------------------------------------------------------------------------

def _presets_dir():
    from importlib import resources
    return resources.files("histoflow.cells").joinpath("presets")


def list_presets() -> list[str]:
    """Names of the built-in rule tables (``load_preset(name)`` loads one)."""
    d = _presets_dir()
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> RuleTable:
    """Load a built-in rule table by name, for example ``load_preset("nucleus_subtype")``."""
    names = list_presets()
    if name not in names:
        raise RuleError(f"no preset rule table {name!r}; presets: {', '.join(names)}")
    from ..utils import yaml_load

    res = _presets_dir().joinpath(f"{name}.yaml")
    d = yaml_load(res.read_text(encoding="utf-8"))
    return RuleTable.from_dict(d, where=f"preset {name!r}")
