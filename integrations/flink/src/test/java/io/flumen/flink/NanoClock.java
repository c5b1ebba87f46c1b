package io.flumen.flink;

import org.apache.flink.table.functions.ScalarFunction;

/**
 * {@code NANO_CLOCK()}: this JVM's {@link System#nanoTime()} when a row passes, for
 * the benchmark's per-row latency (the test job's local cluster runs in one JVM, so
 * the stamps of one row taken before and after {@code ML_PREDICT} compare).
 * Not deterministic, so the planner evaluates it per row where the query puts it.
 */
public final class NanoClock extends ScalarFunction {
    private static final long serialVersionUID = 1L;

    public long eval() {
        return System.nanoTime();
    }

    @Override
    public boolean isDeterministic() {
        return false;
    }
}
