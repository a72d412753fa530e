# Sourced by the benchmark scripts: JSON strings and arrays from shell values.
jstr() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }
jarr() {
    local first=1 a
    printf '['
    for a in "$@"; do
        [ $first = 1 ] || printf ','
        first=0
        jstr "$a"
    done
    printf ']'
}
