"""The library of reusable ``/lib`` subgraphs that ``type: subgraph`` nodes call by path.

Where callees come from, later sources overriding earlier ones for one run:

1. the library directories (``Paths.lib_dirs``: ``$PCRT_HOME/lib``, then each directory of
   ``PCRT_LIB_PATH``): every ``.yaml``/``.yml``/``.json``/``.toml`` file below them;
   documents whose ``dag`` is not a ``/lib/...`` path are not library entries and are
   skipped;
2. the documents a DAG carries in its own ``library`` field;
3. the documents a run request brings (HTTP body ``library``, ``pcrt dag run --lib``).

Loading never stops at a bad file: a file that does not parse, or two files that claim
the same path, become problems naming the files, collected in ``Library.problems`` so that
one bad file hides nothing. A run that calls subgraphs reports them with its other
problems; ``pcrt dag lib`` lists them.

A run records the callees it can reach in its stored document (``with_library``): the
library of the top-level run resolves every call at any depth, and a resume, or a peer the
run moves to, calls exactly the subgraphs the run started with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcrt.runtime.dag.load import SUFFIXES, parse_dag, parse_dag_text, read_document
from pcrt.runtime.dag.spec import DagSpec, SubgraphNode
from pcrt.runtime.errors import DagInvalid, Problem

__all__ = [
    "Library",
    "calls_subgraphs",
    "library_from_documents",
    "load_library",
    "load_library_paths",
    "run_library",
    "with_library",
]


@dataclass(frozen=True)
class Library:
    """``/lib`` DAGs by path, where each came from, and what could not be loaded."""

    dags: Mapping[str, DagSpec] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)  # path -> file or "library[i]"
    problems: tuple[Problem, ...] = ()

    def overridden_by(self, other: Library) -> Library:
        """This library with ``other``'s entries replacing same-path ones; problems of both."""
        return Library(
            dags={**self.dags, **other.dags},
            sources={**self.sources, **other.sources},
            problems=(*self.problems, *other.problems),
        )

    def closure(self, spec: DagSpec) -> dict[str, DagSpec]:
        """Every library DAG ``spec`` can reach through subgraph calls, in call order.
        Unknown paths are left out: validation reports them on the calling node."""
        reached: dict[str, DagSpec] = {}
        pending = [spec]
        while pending:
            current = pending.pop(0)
            for node in current.nodes.values():
                if not isinstance(node, SubgraphNode) or node.dag in reached:
                    continue
                callee = self.dags.get(node.dag)
                if callee is not None:
                    reached[node.dag] = callee
                    pending.append(callee)
        return reached


def calls_subgraphs(spec: DagSpec) -> bool:
    return any(isinstance(node, SubgraphNode) for node in spec.nodes.values())


def load_library(dirs: Iterable[Path]) -> Library:
    """Every ``/lib`` DAG file below ``dirs`` (missing directories are skipped)."""
    files: list[Path] = []
    for directory in dirs:
        if directory.is_dir():
            files.extend(_dag_files(directory))
    return _from_files(files, explicit=False)


def load_library_paths(paths: Iterable[Path]) -> Library:
    """``--lib FILE_OR_DIR``: a directory as in ``load_library``; a file must be a ``/lib``
    DAG (it was named on purpose, so anything else is a problem, not skipped)."""
    library = Library()
    for path in paths:
        if path.is_dir():
            library = library.overridden_by(load_library([path]))
        else:
            library = library.overridden_by(_from_files([path], explicit=True))
    return library


def library_from_documents(
    documents: Sequence[Mapping[str, Any] | str], *, origin: str = "library"
) -> Library:
    """Library DAGs given as documents (decoded, or YAML / JSON / TOML text), each named
    ``origin[i]`` in problems. Text is always a document, never a file name: documents
    arrive over HTTP, and a path must not make the daemon read its own files."""
    dags: dict[str, DagSpec] = {}
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    for index, document in enumerate(documents):
        where = f"{origin}[{index}]"
        try:
            if isinstance(document, str):
                spec = parse_dag_text(document)
            else:
                spec = parse_dag(document, source=where)
        except DagInvalid as exc:
            problems.extend(_located(where, exc.problems))
            continue
        _add(spec, where, where, dags, sources, problems)
    return Library(dags, sources, tuple(problems))


def run_library(spec: DagSpec, dirs: Iterable[Path], extra: Library | None = None) -> Library:
    """The library one run of ``spec`` calls into: the directories, then the documents
    ``spec`` carries, then ``extra`` (the request's). The directories are only read when
    something calls a subgraph."""
    carried = library_from_documents(spec.library, origin=f"{spec.dag} library")
    extra = extra or Library()
    callers = [spec, *carried.dags.values(), *extra.dags.values()]
    base = load_library(dirs) if any(calls_subgraphs(c) for c in callers) else Library()
    return base.overridden_by(carried).overridden_by(extra)


def with_library(spec: DagSpec, dags: Mapping[str, DagSpec]) -> DagSpec:
    """``spec`` carrying exactly ``dags`` (none: no ``library`` key at all). The callees'
    own ``library`` fields are dropped: the caller's library resolves every call."""
    if not dags and not spec.library:
        return spec
    document = spec.document()
    document.pop("library", None)
    if dags:
        document["library"] = [_without_library(callee) for callee in dags.values()]
    return parse_dag(document, source=spec.dag)


def _without_library(spec: DagSpec) -> dict[str, Any]:
    document = spec.document()
    document.pop("library", None)
    return document


def _dag_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def _from_files(files: Iterable[Path], *, explicit: bool) -> Library:
    dags: dict[str, DagSpec] = {}
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    for path in files:
        where = f"library file {path}"
        try:
            document = read_document(path)
            named = document.get("dag") if isinstance(document, dict) else None
            if not explicit and not (isinstance(named, str) and named.startswith("/lib/")):
                continue  # a /dynamic DAG beside the library: not an entry
            spec = parse_dag(document, source=str(path))
        except DagInvalid as exc:
            problems.extend(_located(where, exc.problems))
            continue
        _add(spec, where, str(path), dags, sources, problems)
    return Library(dags, sources, tuple(problems))


def _add(
    spec: DagSpec,
    where: str,
    source: str,
    dags: dict[str, DagSpec],
    sources: dict[str, str],
    problems: list[Problem],
) -> None:
    """Admit a /lib document; keep the first of two with one path, and say so: neither
    silently wins."""
    if not spec.is_library:
        problems.append(Problem(message=f"{where}: {spec.dag} is not a /lib/... subgraph"))
        return
    if spec.dag in dags:
        problems.append(
            Problem(message=f"{spec.dag} is defined twice: in {sources[spec.dag]} and {source}")
        )
        return
    dags[spec.dag] = spec
    sources[spec.dag] = source


def _located(where: str, problems: Iterable[Problem]) -> list[Problem]:
    return [Problem(message=f"{where}: {problem}") for problem in problems]
