"""Hand-written target-matching cases, expected decisions derived from peft's documented rules.

Shared by ``tests/core/test_matching.py`` (peftcore must agree) and
``tests/oracle/test_matching_vs_peft.py`` (peft itself must agree, so a wrong expectation here
fails loudly). Every config is valid for peft's ``LoraConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

T, E, U = "targeted", "excluded", "unmatched"

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
K = "model.layers.0.self_attn.k_proj"
Q1 = "model.layers.1.self_attn.q_proj"
Q11 = "model.layers.11.self_attn.q_proj"
UP1 = "model.layers.1.mlp.up_proj"
UP11 = "model.layers.11.mlp.up_proj"
EXPERT = "model.layers.1.mlp.experts.0.w1"
MOE_GATE = "model.layers.3.mlp.experts.7.gate_proj"
GPT2_ATTN = "transformer.h.3.attn.c_attn"
BERT_QUERY = "bert.encoder.layer.0.attention.self.query"


@dataclass(frozen=True)
class MatchCase:
    id: str
    key: str
    expected: str  # T, E or U
    config: dict[str, Any] = field(default_factory=dict)


MATCH_CASES = [
    # list entries: exact full name or whole dotted suffix, never a substring, never a regex
    MatchCase("list-suffix", Q, T, {"target_modules": ["q_proj"]}),
    MatchCase("list-no-substring", Q, U, {"target_modules": ["proj"]}),
    MatchCase("list-dotted-suffix", Q, T, {"target_modules": ["self_attn.q_proj"]}),
    MatchCase("list-partial-component", Q, U, {"target_modules": ["attn.q_proj"]}),
    MatchCase("list-exact-full-name", Q, T, {"target_modules": [Q]}),
    MatchCase("list-exact-top-level", "lm_head", T, {"target_modules": ["lm_head"]}),
    MatchCase("list-top-level-not-substring", "lm_head", U, {"target_modules": ["head"]}),
    MatchCase("list-root-level-name", "q_proj", T, {"target_modules": ["q_proj"]}),
    MatchCase("list-entry-is-not-regex", Q, U, {"target_modules": [".*q_proj"]}),
    MatchCase("list-case-sensitive", Q, U, {"target_modules": ["Q_proj"]}),
    MatchCase("list-other-module", K, U, {"target_modules": ["q_proj", "v_proj"]}),
    MatchCase("list-second-entry", V, T, {"target_modules": ["q_proj", "v_proj"]}),
    # a string is a regex that must match the whole name
    MatchCase("regex-full", Q, T, {"target_modules": ".*q_proj"}),
    MatchCase("regex-not-partial", Q, U, {"target_modules": "q_proj"}),
    MatchCase("regex-bare-name-top-level", "q_proj", T, {"target_modules": "q_proj"}),
    MatchCase("regex-alternation-hit", V, T, {"target_modules": r".*\.(q_proj|v_proj)"}),
    MatchCase("regex-alternation-miss", K, U, {"target_modules": r".*\.(q_proj|v_proj)"}),
    MatchCase("regex-layer-anchor-hit", UP1, T, {"target_modules": r"model\.layers\.1\..*proj"}),
    MatchCase("regex-layer-anchor-miss", UP11, U, {"target_modules": r"model\.layers\.1\..*proj"}),
    # exclude_modules comes first, and excludes even modules that are not targets
    MatchCase("exclude-list-exact", Q, E, {"target_modules": ["q_proj"], "exclude_modules": [Q]}),
    MatchCase("exclude-list-suffix", Q, E, {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["q_proj"]}),
    MatchCase("exclude-list-other", V, T, {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["q_proj"]}),
    MatchCase("exclude-list-no-substring", Q, T, {"target_modules": ["q_proj"], "exclude_modules": ["proj"]}),
    MatchCase("exclude-regex-hit", Q, E, {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.0\..*"}),
    MatchCase("exclude-regex-miss", Q1, T, {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.0\..*"}),
    MatchCase("exclude-regex-not-partial", Q, T, {"target_modules": ["q_proj"], "exclude_modules": "q_proj"}),
    MatchCase("exclude-non-target", K, E, {"target_modules": ["q_proj"], "exclude_modules": ["k_proj"]}),
    MatchCase("exclude-beats-exact-target", Q, E, {"target_modules": [Q], "exclude_modules": ["q_proj"]}),
    MatchCase("exclude-beats-regex-target", Q, E, {"target_modules": ".*proj", "exclude_modules": ["q_proj"]}),
    # modules_to_save (and anything inside one) is never adapted
    MatchCase("mts-same-module", "lm_head", E, {"target_modules": ["lm_head"], "modules_to_save": ["lm_head"]}),
    MatchCase("mts-inner-module", "classifier.dense", E,
              {"target_modules": ["dense"], "modules_to_save": ["classifier"]}),
    MatchCase("mts-dotted-inner", "model.layers.0.mlp.up_proj", E,
              {"target_modules": ["up_proj"], "modules_to_save": ["layers.0.mlp"]}),
    MatchCase("mts-name-prefix-only", "model.score_proj", T,
              {"target_modules": ["score_proj"], "modules_to_save": ["score"]}),
    MatchCase("mts-component-prefix-only", "model.layers.0.mlp_norm", T,
              {"target_modules": ["mlp_norm"], "modules_to_save": ["mlp"]}),
    MatchCase("mts-other-module", Q, T, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    # layers_to_transform: int or list, default index regex = first "<name>.<digits>." segment
    MatchCase("ltt-int-hit", Q, T, {"target_modules": ["q_proj"], "layers_to_transform": 0}),
    MatchCase("ltt-int-miss", Q1, U, {"target_modules": ["q_proj"], "layers_to_transform": 0}),
    MatchCase("ltt-list-hit", Q1, T, {"target_modules": ["q_proj"], "layers_to_transform": [1, 2]}),
    MatchCase("ltt-list-miss", Q, U, {"target_modules": ["q_proj"], "layers_to_transform": [1, 2]}),
    MatchCase("ltt-list-no-prefix-digits", Q11, U, {"target_modules": ["q_proj"], "layers_to_transform": [1, 2]}),
    MatchCase("ltt-empty-list-is-off", Q11, T, {"target_modules": ["q_proj"], "layers_to_transform": []}),
    MatchCase("ltt-exact-name-skips-filter", "lm_head", T, {"target_modules": ["lm_head"], "layers_to_transform": [0]}),
    MatchCase("ltt-exact-full-name-skips-filter", Q, T, {"target_modules": [Q], "layers_to_transform": [1]}),
    MatchCase("ltt-no-index-in-name", "pooler.dense", U, {"target_modules": ["dense"], "layers_to_transform": [0]}),
    MatchCase("ltt-needs-dot-before-name", "layers.0.q_proj", U,
              {"target_modules": ["q_proj"], "layers_to_transform": [0]}),
    MatchCase("ltt-moe-first-index-layer", EXPERT, T, {"target_modules": ["w1"], "layers_to_transform": [1]}),
    MatchCase("ltt-moe-expert-index-ignored", EXPERT, U, {"target_modules": ["w1"], "layers_to_transform": [0]}),
    MatchCase("ltt-moe-gate-layer-3", MOE_GATE, T, {"target_modules": ["gate_proj"], "layers_to_transform": 3}),
    MatchCase("ltt-moe-gate-not-expert-7", MOE_GATE, U, {"target_modules": ["gate_proj"], "layers_to_transform": 7}),
    MatchCase("ltt-bert-layer", BERT_QUERY, T, {"target_modules": ["query"], "layers_to_transform": [0]}),
    MatchCase("ltt-excluded-first", Q, E,
              {"target_modules": ["q_proj"], "layers_to_transform": [1], "exclude_modules": ["q_proj"]}),
    # layers_pattern: "<pattern>.<digits>." at the start or after a dot; str or list tried in order
    MatchCase("lp-hit", Q1, T, {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    MatchCase("lp-at-start", "layers.0.q_proj", T,
              {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}),
    MatchCase("lp-gpt2-h", GPT2_ATTN, T,
              {"target_modules": ["c_attn"], "layers_to_transform": [3], "layers_pattern": "h"}),
    MatchCase("lp-wrong-name", GPT2_ATTN, U,
              {"target_modules": ["c_attn"], "layers_to_transform": [3], "layers_pattern": "layers"}),
    MatchCase("lp-not-substring", Q1, U,
              {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layer"}),
    MatchCase("lp-list-second", Q1, T,
              {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]}),
    MatchCase("lp-list-first-wins", "model.blocks.2.layers.5.fc", T,
              {"target_modules": ["fc"], "layers_to_transform": [2], "layers_pattern": ["blocks", "layers"]}),
    MatchCase("lp-list-first-wins-miss", "model.blocks.2.layers.5.fc", U,
              {"target_modules": ["fc"], "layers_to_transform": [5], "layers_pattern": ["blocks", "layers"]}),
    MatchCase("lp-nested-index", "model.encoder.layers.0.blocks.5.fc", T,
              {"target_modules": ["fc"], "layers_to_transform": [5], "layers_pattern": "blocks"}),
    MatchCase("lp-moe-expert-pattern", MOE_GATE, T,
              {"target_modules": ["gate_proj"], "layers_to_transform": [7], "layers_pattern": "experts"}),
    MatchCase("lp-regex-pattern", BERT_QUERY, T,
              {"target_modules": ["query"], "layers_to_transform": [0], "layers_pattern": r"encoder\.layer"}),
    MatchCase("lp-top-level-alternation-captures-nothing", "model.encoder.layer.0.q_proj", U,
              {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": r"encoder\.layer|layers"}),
    MatchCase("lp-empty-list-uses-default", Q1, T,
              {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": []}),
    # target_parameters-only configs adapt no module
    MatchCase("target-parameters-only", "model.layers.0.mlp.experts", U,
              {"target_modules": None, "target_parameters": ["experts.gate_up_proj"]}),
]


@dataclass(frozen=True)
class PatternCase:
    id: str
    patterns: dict[str, int]  # insertion order matters
    key: str
    expected: str  # the winning pattern key, or the module key itself


PATTERN_CASES = [
    PatternCase("suffix", {"q_proj": 4}, Q, "q_proj"),
    PatternCase("no-substring", {"proj": 4}, Q, Q),
    PatternCase("dotted-suffix", {"self_attn.q_proj": 4}, Q, "self_attn.q_proj"),
    PatternCase("partial-component", {"attn.q_proj": 4}, Q, Q),
    PatternCase("anchored-regex-hit", {"^model.layers.1.*q_proj": 4}, Q1, "^model.layers.1.*q_proj"),
    PatternCase("anchored-regex-also-11", {"^model.layers.1.*q_proj": 4}, Q11, "^model.layers.1.*q_proj"),
    PatternCase("anchored-regex-miss", {"^model.layers.1.*q_proj": 4}, Q, Q),
    PatternCase("first-wins", {"q_proj": 2, "self_attn.q_proj": 6}, Q, "q_proj"),
    PatternCase("first-wins-reversed", {"self_attn.q_proj": 6, "q_proj": 2}, Q, "self_attn.q_proj"),
    PatternCase("alternation", {"v_proj|q_proj": 4}, Q, "v_proj|q_proj"),
    PatternCase("must-end", {"mlp": 4}, UP1, UP1),
    PatternCase("regex-tail", {"mlp.*": 4}, UP1, "mlp.*"),
    PatternCase("exact-layer", {"layers.0.self_attn.q_proj": 2}, Q, "layers.0.self_attn.q_proj"),
    PatternCase("exact-layer-not-10", {"layers.0.self_attn.q_proj": 2}, "model.layers.10.self_attn.q_proj",
                "model.layers.10.self_attn.q_proj"),
    PatternCase("unescaped-dot", {".0.self_attn.q_proj": 2}, "model.layers.10.self_attn.q_proj", ".0.self_attn.q_proj"),
    PatternCase("full-name", {Q: 2}, Q, Q),
    PatternCase("skip-nonmatching-first", {"k_proj": 2, "q_proj": 3}, Q, "q_proj"),
    PatternCase("empty", {}, Q, Q),
]


@dataclass(frozen=True)
class RankAlphaCase:
    id: str
    config: dict[str, Any]
    key: str
    expected: tuple[int, float]


_RA = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}}

RANK_ALPHA_CASES = [
    RankAlphaCase("rank-only", _RA, Q, (4, 16.0)),
    RankAlphaCase("alpha-only", _RA, V, (8, 32.0)),
    RankAlphaCase("defaults", _RA, K, (8, 16.0)),
    RankAlphaCase("regex-layer", {"r": 8, "lora_alpha": 8, "rank_pattern": {r"^model\.layers\.1\..*": 2},
                                  "alpha_pattern": {}}, Q1, (2, 8.0)),
    RankAlphaCase("regex-layer-miss", {"r": 8, "lora_alpha": 8, "rank_pattern": {r"^model\.layers\.1\..*": 2},
                                       "alpha_pattern": {}}, Q, (8, 8.0)),
    RankAlphaCase("first-wins", {"r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 2, "self_attn.q_proj": 6},
                                 "alpha_pattern": {"self_attn.q_proj": 3, "q_proj": 5}}, Q, (2, 3.0)),
]
