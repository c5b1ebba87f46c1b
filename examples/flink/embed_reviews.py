"""Embeds review texts with Flumen from a PyFlink Table API job.

Needs `pip install apache-flink==2.3.0`, `bash scripts/flink.sh` (it builds
target/flink/flumen-flink.jar) and `flumen serve examples/config/gateway.toml` (its
`all-MiniLM-L6-v2` model is the embedded one) listening on 127.0.0.1:8080. Not run by the
tests (PyFlink and its dependencies are ~850 MB); the same SQL runs in
crates/flumen-cli/tests/flink.rs through a Java main.
"""

import pathlib

from pyflink.table import EnvironmentSettings, TableEnvironment

JAR = pathlib.Path(__file__).resolve().parents[2] / "target" / "flink" / "flumen-flink.jar"

t_env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
t_env.get_config().set("pipeline.jars", JAR.as_uri())
t_env.execute_sql(
    "CREATE TABLE reviews (id BIGINT, text STRING) WITH ("
    " 'connector' = 'filesystem', 'path' = 'examples/data/reviews.jsonl', 'format' = 'json')"
)
t_env.execute_sql(
    "CREATE MODEL review_embedding INPUT (text STRING) OUTPUT (embedding ARRAY<FLOAT>, error STRING) "
    "WITH ('provider' = 'flumen', 'endpoint' = 'http://127.0.0.1:8080', 'model' = 'all-MiniLM-L6-v2')"
)
result = t_env.execute_sql(
    "SELECT id, embedding, error FROM ML_PREDICT(TABLE reviews, MODEL review_embedding, DESCRIPTOR(text), "
    "MAP['max-concurrent-operations', '64', 'output-mode', 'ALLOW_UNORDERED'])"
)
with result.collect() as rows:
    for row in rows:
        print(row[0], "error" if row[2] else len(row[1]), row[2] or "")
