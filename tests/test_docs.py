"""The README and docs/ pages: every link stays inside the repository and resolves, every
docs page is reachable from the README, and the README stays a ten-minute read."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
# [text](target) outside code spans; the target up to the first space or ')'.
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)[^)]*\)')


def _pages() -> list[str]:
  return [os.path.join(ROOT, 'README.md')] + sorted(
      os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith('.md'))


def _links(path: str) -> list[str]:
  text = open(path, encoding='utf-8').read()
  text = re.sub(r'```.*?```', '', text, flags=re.DOTALL)  # Code blocks are not links.
  return LINK.findall(text)


def test_every_link_resolves_inside_the_repository():
  bad = []
  for page in _pages():
    for target in _links(page):
      path = target.split('#')[0]
      if re.match(r'^[a-z][a-z0-9+.-]*:', target) or not path:
        bad.append((page, target, 'not a relative path to a file'))
        continue
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), path))
      if os.path.commonpath([resolved, ROOT]) != ROOT:
        bad.append((page, target, 'leaves the repository'))
      elif not os.path.exists(resolved):
        bad.append((page, target, 'does not exist'))
  assert not bad, '\n'.join(f'{os.path.relpath(p, ROOT)}: {t}: {why}' for p, t, why in bad)


def test_every_docs_page_is_linked_from_the_readme():
  linked = {os.path.normpath(os.path.join(ROOT, t.split('#')[0]))
            for t in _links(os.path.join(ROOT, 'README.md'))}
  missing = [os.path.relpath(p, ROOT) for p in _pages()[1:] if p not in linked]
  assert not missing, f'not linked from README.md: {missing}'


def test_the_readme_is_at_most_about_200_lines():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    assert len(f.read().splitlines()) <= 200
