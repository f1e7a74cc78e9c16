"""MkDocs hooks (mkdocs.yml `hooks:`): the README as the home page, the repository's files that
pages link to outside docs/, and a check that the API overview lists all of `bilevel.__all__`.

Every page keeps the links that work where it lies in the repository (and on a code host):
docs/benchmarks.md shows ../benchmarks/results/w1_full.png, where `bilevel bench` writes it, and
README.md links examples/README.md. MkDocs knows only the files under docs/, so this hook adds
README.md as index.md (its relative links rewritten to start from docs/) and, page by page, every
existing repository file a page links to outside docs/, at the same relative path. The links
then resolve, and `mkdocs build --strict` still fails on one whose target does not exist.

docs/api/index.md links every public name as `[bilevel.NAME][]`; a name added to
`bilevel.__all__` without a line there is a warning, so the strict build fails until it has one.
"""

from __future__ import annotations

import ast
import logging
import os
import posixpath
import re

from mkdocs.structure.files import File, InclusionLevel

# The target of an inline link or image, `](target)` or `](target "title")`; anchors excluded.
LINK_TARGET = re.compile(r"\]\(([^)\s#]+)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|/|#)", re.IGNORECASE)
API_OVERVIEW = "api/index.md"
PACKAGE_INIT = os.path.join("src", "bilevel", "__init__.py")
log = logging.getLogger("mkdocs.hooks")  # MkDocs counts its warnings in strict mode


def on_files(files, config):
    """Add the home page and the linked repository files (MkDocs event, before any page)."""
    root = os.path.dirname(os.path.abspath(config.config_file_path))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as readme:
        home = LINK_TARGET.sub(lambda m: "](" + _from_docs(m.group(1), root, config), readme.read())
    files.append(File.generated(config, "index.md", content=home))

    pending = list(files.documentation_pages())
    while pending:
        page = pending.pop()
        for target in LINK_TARGET.findall(page.content_string):
            added = _outside_file(page, target, root, config)
            if added is not None and files.get_file_from_path(added.src_uri) is None:
                files.append(added)
                if added.is_documentation_page():
                    pending.append(added)  # its own links, in turn
    return files


def _from_docs(target: str, root: str, config) -> str:
    """A link relative to the repository's root, as seen from docs/ (external ones unchanged)."""
    if EXTERNAL.match(target):
        return target
    return posixpath.relpath(os.path.join(root, target), config.docs_dir).replace(os.sep, "/")


def _outside_file(page: File, target: str, root: str, config) -> File | None:
    """The repository file outside docs/ that `target` (a link on `page`) names, if it exists."""
    if EXTERNAL.match(target):
        return None
    src_uri = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), target))
    path = os.path.normpath(os.path.join(config.docs_dir, src_uri))
    in_repository = os.path.relpath(path, root)
    if not src_uri.startswith("../") or in_repository.startswith("..") or not os.path.isfile(path):
        return None  # inside docs/ (MkDocs has it), outside the repository, or missing
    # where it lands in the site: as if docs/ were the repository's root
    site_path = File(in_repository, root, config.site_dir, config.use_directory_urls).dest_uri
    return File(
        src_uri,
        config.docs_dir,
        config.site_dir,
        config.use_directory_urls,
        dest_uri=site_path,
        inclusion=InclusionLevel.INCLUDED,  # MkDocs would exclude a path that starts with "."
    )


def on_page_markdown(markdown, page, config, files):
    """Warn about each public name that the API overview does not link (MkDocs event)."""
    if page.file.src_uri == API_OVERVIEW:
        root = os.path.dirname(os.path.abspath(config.config_file_path))
        for name in _public_names(os.path.join(root, PACKAGE_INIT)):
            if f"[bilevel.{name}]" not in markdown:
                log.warning(f"{API_OVERVIEW} does not list bilevel.{name}: add [bilevel.{name}][]")
    return markdown


def _public_names(path: str) -> list[str]:
    """The literal `__all__` of a module, read without importing it (no torch needed)."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{path} has no literal __all__")
