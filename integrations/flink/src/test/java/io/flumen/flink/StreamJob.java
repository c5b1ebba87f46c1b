package io.flumen.flink;

import java.util.concurrent.TimeUnit;

import org.apache.flink.streaming.api.datastream.AsyncDataStream;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.util.CloseableIterator;

/**
 * A DataStream job on a local mini-cluster, for the tests: the review texts of
 * {@link SqlJob} for ids 1..rows through {@link FlumenAsyncFunction}, each outcome
 * printed as one JSON line, then {@code DONE <rows>}. Arguments: {@code endpoint},
 * {@code model}, {@code protocol}, {@code rows}, {@code parallelism}, {@code ordered}.
 */
public final class StreamJob {
    public static void main(String[] args) throws Exception {
        java.util.Map<String, String> a = new java.util.HashMap<>();
        a.put("protocol", "openai-embeddings");
        a.put("rows", "100");
        a.put("parallelism", "2");
        a.put("ordered", "false");
        SqlJob.arguments(args, a, null);
        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
        env.setParallelism(Integer.parseInt(a.get("parallelism")));
        DataStream<String> texts = env.fromSequence(1, Long.parseLong(a.get("rows"))).map(StreamJob::text);
        FlumenAsyncFunction f = FlumenAsyncFunction.builder(a.get("endpoint"), a.get("model"))
                .protocol(a.get("protocol"))
                .build();
        DataStream<FlumenResult> out = Boolean.parseBoolean(a.get("ordered"))
                ? AsyncDataStream.orderedWait(texts, f, 3, TimeUnit.MINUTES, 10)
                : AsyncDataStream.unorderedWait(texts, f, 3, TimeUnit.MINUTES, 10);
        long n = 0;
        try (CloseableIterator<FlumenResult> it = out.executeAndCollect()) {
            while (it.hasNext()) {
                FlumenResult r = it.next();
                String id = r.input.substring("review ".length(), r.input.indexOf(':'));
                StringBuilder line = new StringBuilder("{\"id\":").append(id).append(",\"prediction\":");
                if (r.vector != null) {
                    line.append('[');
                    for (int i = 0; i < r.vector.length; i++) {
                        line.append(i > 0 ? "," : "").append(r.vector[i]);
                    }
                    line.append(']');
                } else if (r.text != null) {
                    Json.string(line, r.text);
                } else {
                    line.append("null");
                }
                line.append(",\"error\":");
                if (r.error == null) {
                    line.append("null");
                } else {
                    Json.string(line, r.error);
                }
                System.out.println(line.append('}'));
                n++;
            }
        }
        System.out.println("DONE " + n);
    }

    private static String text(long id) {
        String[] tails = {"great value, arrived early", "the strap broke after a week", "works as described",
            "would not buy again"};
        return "review " + id + ": " + tails[(int) (id % 4)];
    }
}
