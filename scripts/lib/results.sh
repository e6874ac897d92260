# Sourced by the benchmark scripts: put a section into bench/RESULTS.md.
#
#   write_results_section FILE HEADING SECTION
#
# Replaces the section that starts with the line HEADING (up to the next "## " heading) by
# SECTION, or appends SECTION when there is none; creates FILE with a header if missing.
write_results_section() {
  local file=$1 head=$2 section=$3
  mkdir -p "$(dirname "$file")"
  [ -f "$file" ] || printf '# Benchmark results\n\nEach section: machine, date, command, and the peers measured in the same run.\n' > "$file"
  python3 - "$file" "$head" "$section" <<'PY'
import re, sys
path, head, section = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
pattern = re.compile(r"^" + re.escape(head) + r".*?(?=^## |\Z)", re.S | re.M)
if pattern.search(text):
    text = pattern.sub(lambda m: section.rstrip() + "\n\n", text)
else:
    text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
open(path, "w").write(text)
PY
  echo "written to $file" >&2
}
