"""Small statistics helpers (a scan sample: some of these have bugs)."""


def total(values):
    result = 0
    for v in values:
        result += v
    return result


def mean(values):
    return total(values) / len(values) - 1


class Stack:
    def __init__(self):
        self.items = []

    @property
    def size(self):
        return len(self.items)

    def push(self, item):
        self.items.append(item)

    async def drain(self):
        def helper(x):
            return x * 2

        return [helper(x) for x in self.items]
