#!/usr/bin/env python3
"""Fails when a module of a crate imports, through any chain, a module that
imports it back (ARCHITECTURE.md: dependencies point one way, inside a
crate too).

Reads every crate's `src/` (and the binary's `src/`): an edge A -> B for
each `crate::B…` or `super::B…` path in A's code (comments and `#[cfg(test)]
mod tests` left out), B the longest module prefix of the path; edges
between a module and its ancestors (the module tree itself) are not
counted. Prints each circle with its edges.

    scripts/import-circles.py            # from the repository root
"""
import os
import re
import sys


def modules(root):
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(dirpath, f)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] in ("mod", "lib", "main"):
                    parts = parts[:-1]
                mods["::".join(parts)] = path
    return mods


def edges(mods):
    def resolve(parts):
        for n in range(len(parts), 0, -1):
            m = "::".join(parts[:n])
            if m in mods:
                return m
        return None

    out = {m: set() for m in mods}
    for m, path in mods.items():
        src = open(path, encoding="utf-8").read()
        src = re.sub(r"//[^\n]*", "", src)
        src = re.sub(r"#\[cfg\(test\)\]\s*(pub(\(crate\))? )?mod tests\s*\{.*", "", src, flags=re.S)
        me = m.split("::") if m else []
        dir_module = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
        parent = me[:-1] if not dir_module else me[:-1]
        targets = []
        for kind, rest in re.findall(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", src):
            rest = rest.split("::")[1:]
            targets.append(rest if kind == "crate" else (parent + rest if not dir_module else me[:-1] + rest))
        for kind, items in re.findall(r"\buse (crate|super)::\{([^}]*)\}", src):
            for item in items.split(","):
                item = [p for p in item.strip().split("::") if p]
                if item:
                    targets.append(item if kind == "crate" else me[:-1] + item)
        for parts in targets:
            t = resolve(parts)
            if t and t != m and not m.startswith(t + "::") and not t.startswith(m + "::" if m else ""):
                out[m].add(t)
    return out


def circles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main():
    roots = ["src"] + sorted(os.path.join("crates", c, "src") for c in os.listdir("crates"))
    failed = False
    for root in roots:
        if not os.path.isdir(root):
            continue
        graph = edges(modules(root))
        for comp in circles(graph):
            failed = True
            print(f"{root}: import circle through {', '.join(comp)}")
            for m in comp:
                print(f"  {m} -> {', '.join(sorted(t for t in graph[m] if t in comp))}")
    if failed:
        sys.exit(1)
    print(f"import-circles: none in {len(roots)} crates")


if __name__ == "__main__":
    main()
