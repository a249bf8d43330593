"""Supervised feature dictionaries (Makelov, Lange & Nanda 2024): an activation written as a
constant plus one direction per value of each of a task's attributes,

    a(x) ~ c + sum over attributes A of u[A, A(x)],

so each (attribute, value) is a feature, active exactly on the prompts with that value (value 1).
The paper takes u[A, v] = E[a | A = v] - E[a], the centred conditional means; those equal the
least-squares fit when the attributes are independent and balanced. This fits by least squares
(the minimum-norm solution: the one-hot design is rank-deficient by one per attribute), which
is exact whenever the activation is additive in the attributes, independent or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.errors import BadInput


@dataclass
class SupervisedDictionary:
    values: dict[str, torch.Tensor]
    """attribute -> (n_values,) the distinct values it takes, sorted; its features in that order."""
    constant_d: torch.Tensor
    directions: dict[str, torch.Tensor]
    """attribute -> (n_values, d) u[A, v]."""

    @classmethod
    def fit(cls, acts_nd: torch.Tensor, attributes: dict[str, torch.Tensor]) -> SupervisedDictionary:
        """Least squares of `acts_nd` on the one-hot attribute values (`attributes`: name -> (n,))."""
        if not attributes:
            raise BadInput("a supervised dictionary needs at least one attribute")
        values = {name: torch.unique(v) for name, v in attributes.items()}
        design = cls._one_hot(values, attributes).double()
        mean = acts_nd.double().mean(0)
        centred = design - design.mean(0)
        weights = torch.linalg.pinv(centred) @ (acts_nd.double() - mean)
        constant = mean - design.mean(0) @ weights
        directions, start = {}, 0
        for name, v in values.items():
            directions[name] = weights[start : start + len(v)].to(acts_nd.dtype)
            start += len(v)
        return cls(values, constant.to(acts_nd.dtype), directions)

    @staticmethod
    def _one_hot(values: dict[str, torch.Tensor], attributes: dict[str, torch.Tensor]) -> torch.Tensor:
        columns = []
        for name, v in values.items():
            given = attributes[name]
            hot = given[:, None] == v[None]
            unseen = ~hot.any(1)
            if unseen.any():
                raise BadInput(f"attribute {name} takes values the dictionary was not fitted on "
                               f"({sorted(set(given[unseen].tolist()))}); fit it on prompts that hold every value")
            columns.append(hot)
        return torch.cat(columns, 1)

    @property
    def n_features(self) -> int:
        return sum(len(v) for v in self.values.values())

    def active(self, attributes: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, n_features) bool: which features each prompt's attribute values turn on."""
        return self._one_hot(self.values, attributes)

    def reconstruct(self, attributes: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, d): c + the sum of each prompt's features."""
        weights = torch.cat([self.directions[name] for name in self.values])
        return self.constant_d + self.active(attributes).to(weights) @ weights

    def edit(self, acts_nd: torch.Tensor, attribute: str, old_n: torch.Tensor, new_n: torch.Tensor) -> torch.Tensor:
        """`acts_nd` with one attribute's feature exchanged: u[A, old] taken out, u[A, new] put in."""
        index = {int(v): i for i, v in enumerate(self.values[attribute].tolist())}
        missing = sorted({int(v) for v in torch.cat([old_n, new_n]).tolist()} - set(index))
        if missing:
            raise BadInput(f"attribute {attribute} has no feature for values {missing}")
        u = self.directions[attribute]
        old = u[torch.tensor([index[int(v)] for v in old_n.tolist()])]
        new = u[torch.tensor([index[int(v)] for v in new_n.tolist()])]
        return acts_nd - old.to(acts_nd) + new.to(acts_nd)
