"""Route each prompt record to its teacher: the record's `teacher` field, else its domain.

Routing is checked for the whole prompt set before training starts, so a record whose
domain no teacher claims is an error at start-up rather than at step 3,000.
"""

from __future__ import annotations

from collections import Counter

from uniopd.config import ConfigError, TeacherConfig
from uniopd.data.records import PromptRecord


class Router:
    def __init__(self, teachers: dict[str, TeacherConfig]):
        if not teachers:
            raise ConfigError("teachers: at least one teacher is needed for distillation")
        self.names = list(teachers)
        self.by_domain: dict[str, str] = {}
        self.fallback: str | None = None
        for name, cfg in teachers.items():
            for domain in cfg.domains:
                if domain == "*":
                    self.fallback = name
                else:
                    self.by_domain[domain] = name
        if len(teachers) == 1 and not self.by_domain and self.fallback is None:
            self.fallback = self.names[0]  # a single teacher with no domains scores everything

    def teacher_for(self, record: PromptRecord) -> str:
        if record.teacher is not None:
            if record.teacher not in self.names:
                raise ConfigError(f"record {record.id!r}: teacher {record.teacher!r} is not configured "
                                  f"(teachers: {', '.join(self.names)})")
            return record.teacher
        name = self.by_domain.get(record.domain, self.fallback)
        if name is None:
            raise ConfigError(f"record {record.id!r}: no teacher claims domain {record.domain!r}; add it to "
                              f"teachers.<name>.domains (claimed: {sorted(self.by_domain)}) or use '*'")
        return name

    def check(self, records: list[PromptRecord]) -> Counter:
        """Route every record once; returns records per teacher. Raises on the first unroutable."""
        return Counter(self.teacher_for(r) for r in records)
