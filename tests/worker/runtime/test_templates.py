from __future__ import annotations

from worker.runtime.templates import Templates


def test_a_template_is_made_once_per_key_and_each_use_gets_its_own_copy() -> None:
    templates: Templates[dict[str, list[int]]] = Templates()
    made: list[str] = []

    def make(name: str) -> dict[str, list[int]]:
        made.append(name)
        return {"weights": [1, 2]}

    first = templates.copy_of({"layers": 3, "name": "a"}, lambda: make("a"))
    first["weights"].append(3)  # a load writing its own weights into its copy
    second = templates.copy_of({"name": "a", "layers": 3}, lambda: make("a"))  # same key, any order
    other = templates.copy_of({"layers": 4, "name": "a"}, lambda: make("b"))
    assert made == ["a", "b"] and len(templates) == 2
    assert second == other == {"weights": [1, 2]} and second is not first
