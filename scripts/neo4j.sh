#!/usr/bin/env bash
# Embedded Neo4j 5.26 (community, neo4j-harness) for memq's tests and CI. No Docker, no network at run time.
#
# Usage:
#   scripts/neo4j.sh build                 # compile the launcher; no-op when already built and unchanged
#   scripts/neo4j.sh run [PORT] [DATA_DIR] # start Neo4j; PORT 0/absent = free port, DATA_DIR absent = temp dir
#   scripts/neo4j.sh classpath             # print the runtime classpath (after build)
#
# `run` prints exactly one line on stdout, "NEO4J_READY bolt://127.0.0.1:<port>", once Bolt accepts
# connections; logs go to stderr and DATA_DIR/logs/debug.log. It stops (exit 0) on stdin EOF, SIGTERM or SIGINT.
# User is "neo4j"; the password comes from $NEO4J_PASSWORD (default "memq-test-password").
#
# Environment:
#   NEO4J_PASSWORD          password for user neo4j (passed to Java via the environment, not argv)
#   MEMQ_NEO4J_HEAP         max Java heap, default 512m
#   MEMQ_NEO4J_JAVA_OPTS    extra JVM options appended after the defaults
#   JAVA_HOME               Java 17+ to use (default: java on PATH)
#   MAVEN_OPTS              e.g. "-Dmaven.repo.local=/ci/cache/m2" to move the Maven repository (default ~/.m2)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
PROJECT_DIR="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
LAUNCHER_DIR="${PROJECT_DIR}/neo4j-launcher"
TARGET_DIR="${LAUNCHER_DIR}/target"
JAR="${TARGET_DIR}/memq-neo4j-launcher-0.1.0.jar"
CLASSPATH_FILE="${TARGET_DIR}/classpath.txt"
STAMP_FILE="${TARGET_DIR}/.memq-build-stamp"
MAIN_CLASS="memq.neo4j.Launcher"

log() { printf 'neo4j.sh: %s\n' "$*" >&2; }

java_bin() {
    if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
        printf '%s\n' "${JAVA_HOME}/bin/java"
    else
        command -v java || { log "java not found (need Java 17+)"; exit 1; }
    fi
}

# Hash of everything that affects the build output.
source_stamp() {
    (
        cd "${LAUNCHER_DIR}"
        { printf '%s\n' pom.xml; find src -type f | LC_ALL=C sort; } | xargs sha256sum
    ) | sha256sum | cut -d' ' -f1
}

# True when the jar, the classpath file and every jar it lists exist and the sources are unchanged.
is_built() {
    [[ -f "${JAR}" && -s "${CLASSPATH_FILE}" && -f "${STAMP_FILE}" ]] || return 1
    [[ "$(cat "${STAMP_FILE}")" == "$(source_stamp)" ]] || return 1
    local entry
    local -a entries
    IFS=':' read -r -a entries < "${CLASSPATH_FILE}"
    for entry in "${entries[@]}"; do
        [[ -f "${entry}" ]] || return 1 # e.g. the Maven repository was wiped or moved
    done
}

cmd_build() {
    if is_built; then
        return 0
    fi
    command -v mvn >/dev/null || { log "mvn not found (need Maven 3.8+)"; exit 1; }
    # Serialise concurrent builds (e.g. several pytest-xdist workers starting at once).
    mkdir -p "${TARGET_DIR}"
    exec 9> "${TARGET_DIR}/.build.lock"
    if command -v flock >/dev/null; then
        flock 9
        if is_built; then
            exec 9>&-
            return 0
        fi
    fi
    log "building ${LAUNCHER_DIR} (a cold build downloads ~190 MB into the Maven repository, ~/.m2 by default)"
    local stamp
    stamp="$(source_stamp)"
    # `package` also writes target/classpath.txt (dependency:build-classpath is bound to it in pom.xml).
    # All Maven output goes to stderr so that `run` keeps stdout for the READY line.
    (cd "${LAUNCHER_DIR}" && mvn -q -B -Dstyle.color=never -Dmaven.test.skip=true package) >&2
    printf '%s\n' "${stamp}" > "${STAMP_FILE}"
    exec 9>&-
}

cmd_run() {
    if [[ $# -gt 2 ]]; then
        log "usage: neo4j.sh run [PORT] [DATA_DIR]"
        exit 2
    fi
    cmd_build
    local java
    java="$(java_bin)"
    local -a jvm_opts=(
        "-Xms64m" "-Xmx${MEMQ_NEO4J_HEAP:-512m}"
        "-XX:+UseSerialGC"
        "-XX:+ExitOnOutOfMemoryError"
        # The flags Neo4j's own startup script passes; without them it logs warnings and skips fadvise etc.
        "--add-opens=java.base/java.nio=ALL-UNNAMED"
        "--add-opens=java.base/java.io=ALL-UNNAMED"
        "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED"
        "--add-opens=java.base/java.lang=ALL-UNNAMED"
        "-Dlog4j2.disable.jmx=true"
        "-Dfile.encoding=UTF-8"
    )
    if [[ -n "${MEMQ_NEO4J_JAVA_OPTS:-}" ]]; then
        local -a extra
        read -r -a extra <<< "${MEMQ_NEO4J_JAVA_OPTS}"
        jvm_opts+=("${extra[@]}")
    fi
    exec "${java}" "${jvm_opts[@]}" -cp "${JAR}:$(cat "${CLASSPATH_FILE}")" "${MAIN_CLASS}" "$@"
}

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "${cmd}" in
        build) cmd_build "$@" ;;
        run) cmd_run "$@" ;;
        classpath)
            cmd_build
            printf '%s:%s\n' "${JAR}" "$(cat "${CLASSPATH_FILE}")"
            ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
