package io.flumen.flink;

import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.Map;

import org.apache.flink.table.api.EnvironmentSettings;
import org.apache.flink.table.api.ExplainDetail;
import org.apache.flink.table.api.TableEnvironment;
import org.apache.flink.table.api.TableResult;
import org.apache.flink.types.Row;

/**
 * A Flink SQL job on a local mini-cluster, for the tests and the benchmark: {@code N}
 * generated review texts through {@code ML_PREDICT} with a {@code flumen} model, each
 * outcome printed as one JSON line ({@code {"id":…,"prediction":…,"error":…}}), then
 * {@code DONE <rows>}.
 *
 * <p>Arguments are {@code key=value}: {@code rows}, {@code parallelism}, {@code output}
 * (the OUTPUT column's type, default {@code ARRAY<FLOAT>}), {@code input} (the INPUT
 * column: {@code text} for the review text, or {@code number} for the id as a FLOAT), {@code async},
 * {@code output-mode}, {@code max-concurrent-operations}, {@code long-every} (every
 * that many rows a text of 13,000 characters), and every other key goes into
 * the model's {@code WITH} options (so a misspelled one reaches Flink's validation).
 */
public final class SqlJob {
    public static void main(String[] args) throws Exception {
        Map<String, String> with = new LinkedHashMap<>();
        Map<String, String> run = new LinkedHashMap<>();
        run.put("rows", "100");
        run.put("parallelism", "2");
        run.put("output", "ARRAY<FLOAT>");
        run.put("input", "text");
        run.put("async", "true");
        run.put("output-mode", "ORDERED");
        run.put("max-concurrent-operations", "10");
        run.put("long-every", "0");
        run.put("timing", "false");
        run.put("explain", "false");
        arguments(args, run, with);
        TableEnvironment t = TableEnvironment.create(EnvironmentSettings.inStreamingMode());
        t.getConfig().set("parallelism.default", run.get("parallelism"));
        boolean timing = Boolean.parseBoolean(run.get("timing"));
        t.createTemporarySystemFunction("NANO_CLOCK", NanoClock.class);
        t.executeSql("CREATE TABLE ids (id BIGINT) WITH ('connector' = 'datagen', "
                + "'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '"
                + run.get("rows") + "')");
        t.executeSql("CREATE TEMPORARY VIEW src AS SELECT id, CONCAT('review ', CAST(id AS STRING), ': ', "
                + "CASE MOD(id, 4) WHEN 0 THEN 'great value, arrived early' WHEN 1 THEN 'the strap broke after a week' "
                + "WHEN 2 THEN 'works as described' ELSE 'would not buy again' END) AS txt, "
                + "CAST(id AS FLOAT) AS num, " + (timing ? "NANO_CLOCK()" : "CAST(0 AS BIGINT)") + " AS t0 FROM ids");
        long longEvery = Long.parseLong(run.get("long-every"));
        String view = "src";
        if (longEvery > 0) {
            // Every longEvery-th row far longer than the others (over a size limit).
            t.executeSql("CREATE TEMPORARY VIEW src_long AS SELECT id, CASE WHEN MOD(id, " + longEvery
                    + ") = 0 THEN REPEAT('far too long ', 1000) ELSE txt END AS txt, num, t0 FROM src");
            view = "src_long";
        }
        boolean text = run.get("input").equals("text");
        StringBuilder model = new StringBuilder("CREATE MODEL m INPUT (" + (text ? "txt STRING" : "num FLOAT")
                + ") OUTPUT (prediction " + run.get("output") + ", error STRING) WITH ('provider' = '"
                + (timing ? "flumen-timed" : "flumen") + "'");
        for (Map.Entry<String, String> e : with.entrySet()) {
            model.append(", '").append(e.getKey()).append("' = '").append(e.getValue()).append("'");
        }
        t.executeSql(model.append(")").toString());
        String query = "SELECT id, prediction, error, t0, "
                + (timing ? "NANO_CLOCK()" : "CAST(0 AS BIGINT)") + " AS t1 FROM ML_PREDICT(TABLE " + view + ", MODEL m, DESCRIPTOR("
                + (text ? "txt" : "num") + "), MAP['async', '" + run.get("async") + "', 'output-mode', '"
                + run.get("output-mode") + "', 'max-concurrent-operations', '"
                + run.get("max-concurrent-operations") + "'])";
        if (Boolean.parseBoolean(run.get("explain"))) {
            System.err.println(t.explainSql(query, ExplainDetail.JSON_EXECUTION_PLAN));
        }
        TableResult result = t.executeSql(query);
        long n = 0;
        try (var it = result.collect()) {
            while (it.hasNext()) {
                Row r = it.next();
                StringBuilder line = new StringBuilder("{\"id\":").append(r.getField(0)).append(",\"prediction\":");
                json(line, r.getField(1));
                line.append(",\"error\":");
                json(line, r.getField(2));
                if (timing) {
                    line.append(",\"t0\":").append(r.getField(3)).append(",\"t1\":").append(r.getField(4));
                }
                System.out.println(line.append('}'));
                n++;
            }
        }
        System.out.println("DONE " + n);
        for (long[] call : TimedModelProviderFactory.CALLS) {
            System.out.println("CALL " + call[0] + " " + call[1]);
        }
    }

    /**
     * Reads {@code key=value} arguments into {@code known} where it has the key (its
     * values are the defaults), else into {@code rest}, or into {@code known} too when
     * {@code rest} is null.
     */
    static void arguments(String[] args, Map<String, String> known, Map<String, String> rest) {
        for (String a : args) {
            String[] kv = a.split("=", 2);
            if (kv.length != 2) {
                throw new IllegalArgumentException("not key=value: " + a);
            }
            (rest == null || known.containsKey(kv[0]) ? known : rest).put(kv[0], kv[1]);
        }
    }

    private static void json(StringBuilder out, Object v) {
        if (v == null) {
            out.append("null");
        } else if (v instanceof String) {
            Json.string(out, (String) v);
        } else if (v instanceof Float[]) {
            Float[] a = (Float[]) v;
            out.append('[');
            for (int i = 0; i < a.length; i++) {
                out.append(i > 0 ? "," : "").append(a[i]);
            }
            out.append(']');
        } else if (v instanceof Double[]) {
            Double[] a = (Double[]) v;
            out.append('[');
            for (int i = 0; i < a.length; i++) {
                out.append(i > 0 ? "," : "").append(a[i]);
            }
            out.append(']');
        } else {
            out.append(v);
        }
    }
}
