package io.flumen.flink;

import java.io.Serializable;
import java.util.Arrays;

/**
 * One record's outcome from {@link FlumenAsyncFunction}: the input, and either its
 * prediction — a vector (embeddings, numeric KServe outputs) or a text (chat, string
 * KServe outputs) — or its error, {@code kind: message}.
 */
public final class FlumenResult implements Serializable {
    private static final long serialVersionUID = 1L;

    /** The record sent. */
    public final String input;
    /** The predicted vector, or null. */
    public final float[] vector;
    /** The predicted text, or null. */
    public final String text;
    /** Why there is no prediction ({@code kind: message}), or null. */
    public final String error;

    FlumenResult(String input, float[] vector, String text, String error) {
        this.input = input;
        this.vector = vector;
        this.text = text;
        this.error = error;
    }

    /** Whether the record has its prediction. */
    public boolean ok() {
        return error == null;
    }

    @Override
    public String toString() {
        return "FlumenResult{input=" + input + ", vector=" + Arrays.toString(vector) + ", text=" + text
                + ", error=" + error + "}";
    }
}
