"""One language table: ``kcr_trio.core.languages.LANGUAGES``. Every other copy or per-language list
in the tree must cover exactly its codes (and agree on what both state), so adding or renaming a
language anywhere but the table fails here rather than in a cluster.

The sidecar keeps its own table on purpose: it ships alone in language images and imports nothing
from ``kcr_trio``. The executor settings keep one ``pod_pool_<code>`` field per language because
that is the documented ``POD_POOL_<L>`` environment contract (pydantic-settings reads fields).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kcr_trio.backends import kube_pods
from kcr_trio.bench.client import HELLO
from kcr_trio.config import Settings
from kcr_trio.core.languages import LANGUAGES
from sidecar import languages as sidecar_languages
from sidecar import toolchains

ROOT = Path(__file__).resolve().parents[2]
CODES = set(LANGUAGES)


def test_the_table_is_self_consistent() -> None:
    for code, lang in LANGUAGES.items():
        assert lang.code == code and code == code.lower()
        assert lang.env_suffix == code.upper()  # POD_POOL_<SUFFIX>, LANG_IMAGE_<SUFFIX>


def test_the_sidecar_table_matches() -> None:
    assert set(sidecar_languages.LANGUAGES) == CODES
    for code, spec in sidecar_languages.LANGUAGES.items():
        assert spec.source_file == LANGUAGES[code].source_file, code
    assert sidecar_languages.SOURCE_FILES == {lang.source_file for lang in LANGUAGES.values()}
    assert set(sidecar_languages.ALIASES.values()) <= CODES


def test_pool_settings_cover_exactly_the_table() -> None:
    fields = {name for name in Settings.model_fields if name.startswith("pod_pool_")}
    assert fields == {f"pod_pool_{code}" for code in CODES}
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    for code in CODES:
        assert settings.pool_size(code) == getattr(settings, f"pod_pool_{code}")


def test_derived_per_language_lists_cover_the_table() -> None:
    assert set(kube_pods.IMAGE_SUFFIX) == CODES
    assert kube_pods.RUNNER_UNSUPPORTED <= CODES and kube_pods.RUNNER_LANGUAGE_ARGS <= CODES
    assert set(HELLO) == CODES  # the bench's hello-world per language
    # Every language the sidecar can run has a toolchain check (py is the running interpreter).
    assert set(toolchains._NEEDS) | {"py"} == CODES


def test_the_chart_lists_every_language() -> None:
    values = yaml.safe_load((ROOT / "charts/kcr-trio/values.yaml").read_text())
    [languages] = [v["languages"] for v in values.values() if isinstance(v, dict) and "languages" in v]
    assert set(languages) == CODES


def test_the_image_targets_serve_every_language() -> None:
    """Each image bakes one ``LANGUAGE``; node serves js and ts, c-cpp serves c and cpp."""
    dockerfile = (ROOT / "sidecar/docker/Dockerfile").read_text()
    baked = set(re.findall(r"^ENV LANGUAGE=(\w+)", dockerfile, flags=re.M))
    served = baked | ({"ts"} if "js" in baked else set()) | ({"cpp"} if "c" in baked else set())
    assert baked <= CODES and served == CODES
