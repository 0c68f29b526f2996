"""The root of the settings tree and what every layer shares (env prefix `TWOSTAGE_`, nested with `__`).

Example: `TWOSTAGE_RERANKER__MODEL=/models/my-reranker TWOSTAGE_DEVICE=cpu twostage ...`.

One tree, declared in layers: each layer keeps its sections next to its code
(`retrieval/models/settings.py`, `retrieval/store/settings.py`, ... `api/settings.py`) and a
class that extends the layer below with them, so a module's signature names only the part of the
tree it may read and no layer imports the one above it. The whole tree, read once from the
environment, is `twostage.api.settings.Settings`, the last of these classes; it is a subclass of
every layer's, so one object serves every layer.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DeviceName = Literal["auto", "cpu", "cuda", "mps"] | str
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def available_cores() -> int:
    """CPUs this process may run on (its affinity where the OS says, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CoreSettings(BaseSettings):
    """Where data lives, which collection, which device: what every layer reads."""

    model_config = SettingsConfigDict(
        env_prefix="TWOSTAGE_", env_nested_delimiter="__", extra="ignore", env_parse_none_str="null"
    )

    data_dir: Path = Field(Path(".twostage/data"), description="indexes and registry")
    cache_dir: Path = Field(Path(".twostage/cache"), description="converted models, fingerprints")
    collection: str = Field(
        "docs", description="collection (alias) searched and ingested into; data in NAME__vN"
    )
    device: DeviceName = Field("auto", description="auto: CUDA when present, else CPU")
    dtype: DtypeName = Field(
        "auto", description="auto: bfloat16 on CUDA; on a CPU with native bf16 (AVX512_BF16, AMX, Arm BF16) "
        "bfloat16 for each model measured within numerics' tolerance of float32; float32 elsewhere",
    )  # fmt: skip

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then `saved_settings_file()` (what quickstart chose)."""
        saved = DotEnvSettingsSource(settings_cls, env_file=saved_settings_file())
        return init_settings, env_settings, saved, file_secret_settings


def saved_settings_file() -> Path:
    """`DATA_DIR/settings.env`: choices `twostage quickstart` made (models it fell back to), in
    the environment's own `TWOSTAGE_*` syntax, so every later command on that data directory
    uses the models that built its index. Environment variables override it."""
    return Path(os.environ.get("TWOSTAGE_DATA_DIR", ".twostage/data")) / "settings.env"
