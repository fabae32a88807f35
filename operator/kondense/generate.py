"""Generated files of the repository, one registry: `kondense crd` writes them, a test checks drift."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kondense import crd, demo

CHART = Path("charts/kondense")


def chart_crd() -> str:
    """The CRD as a chart template: behind crds.enabled, kept on uninstall unless crds.keep is false."""
    body = crd.render().removeprefix(crd.HEADER)
    annotated = body.replace(
        "  labels:\n",
        "  annotations:\n"
        "    {{- if .Values.crds.keep }}\n"
        "    helm.sh/resource-policy: keep\n"
        "    {{- end }}\n"
        "  labels:\n",
        1,
    )
    return "{{- if .Values.crds.enabled }}\n" + crd.HEADER + annotated + "{{- end }}\n"


def demo_example() -> str:
    return demo.template()


def chart_values_schema() -> str:
    from kondense import chart

    return chart.values_schema()


FILES: dict[Path, Callable[[], str]] = {
    Path("crds/compressionpipelines.yaml"): crd.render,
    CHART / "templates/crd.yaml": chart_crd,
    CHART / "values.schema.json": chart_values_schema,
    Path("crds/examples/demo.yaml"): demo_example,
}


def write(root: Path) -> list[Path]:
    written = []
    for rel, render in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render())
        written.append(rel)
    return written


def stale(root: Path) -> list[Path]:
    return [rel for rel, render in FILES.items() if not (root / rel).exists() or (root / rel).read_text() != render()]
