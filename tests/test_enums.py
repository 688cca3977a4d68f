"""Enum values by name, known or not."""

from dreamframe.enums import enum_name
from dreamframe.v1 import eval_pb2, qa_pb2


def test_known_values_by_name_unknown_ones_by_prefix_and_number():
    assert enum_name(qa_pb2.DatasetFormat, qa_pb2.DATASET_FORMAT_LLAVA_JSON) == "DATASET_FORMAT_LLAVA_JSON"
    assert enum_name(qa_pb2.DatasetFormat, 77) == "DATASET_FORMAT_77"
    assert enum_name(eval_pb2.BenchmarkKind, 99) == "BENCHMARK_KIND_99"
