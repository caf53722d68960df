"""Parsers of the benchmarks' command-line values: comma-separated lists of numbers, names and KxN shapes."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def int_list(text: str) -> list[int]:
    """'1,16,128' -> [1, 16, 128]."""
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def str_list(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def shape_list(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)] (in_features x out_features)."""
    shapes = []
    for item in str_list(text):
        parts = item.lower().split("x")
        if len(parts) != 2:
            raise SystemExit(f"bad shape {item!r}: expected KxN, e.g. 4096x11008")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def positive_ints(text: str) -> list[int]:
    """An axis option's values: a comma-separated list of positive integers."""
    values = int_list(text)
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 4,16")
    return values


def choice_list(choices: Iterable[str], name: str) -> Callable[[str], list[str]]:
    """A parser of a comma-separated subset of `choices` (lower-cased, duplicates dropped, order kept)."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        values = str_list(text.lower())
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {name} must be among {', '.join(choices)}")
        return list(dict.fromkeys(values))
    return parse


def alias_list(names: dict[str, str], name: str) -> Callable[[str], list[str]]:
    """A parser of a comma-separated list of `names` keys (case-insensitive), each mapped to its value (the
    canonical name), duplicates dropped: e.g. --modes fwd,fwdbwd -> ["fwd", "fwd+bwd"]."""
    def parse(text: str) -> list[str]:
        values = []
        for v in str_list(text):
            if v.lower() not in names:
                raise argparse.ArgumentTypeError(f"unknown {name} {v!r}; use {', '.join(names)}")
            values.append(names[v.lower()])
        return list(dict.fromkeys(values))
    return parse


def add_int_options(p: argparse.ArgumentParser, options: dict[str, str]) -> None:
    """Integer options, `flag: help` each, None when not given (the preset's value then applies)."""
    for flag, text in options.items():
        p.add_argument(flag, type=int, help=text)
