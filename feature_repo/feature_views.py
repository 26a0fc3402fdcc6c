from datetime import timedelta

from feast import FeatureView, Field, FileSource
from feast.types import Array, Bool, Float64, Int64, String

from feature_repo.entities import customer
from features.catalog import Feature

_FEAST_TYPES = {"int": Int64, "float": Float64, "bool": Bool, "string": String,
                "int_list": Array(Int64), "float_list": Array(Float64)}


def feature_view(name: str, features: list[Feature], source: FileSource, ttl_days: int) -> FeatureView:
    """A view over the shared snapshot source holding ``features`` (named ``<name>_fv``)."""
    return FeatureView(
        name=f"{name}_fv",
        entities=[customer],
        ttl=timedelta(days=ttl_days),
        schema=[Field(name=f.name, dtype=_FEAST_TYPES[f.dtype], description=f.doc) for f in features],
        source=source,
        online=True,
        tags={"produced_by": "engage features build"},
    )
