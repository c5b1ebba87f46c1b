package io.flumen.flink;

/** A row failed and the model says {@code 'on-error' = 'fail'}. */
public final class FlumenException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    FlumenException(String message) {
        super("flumen: a row failed: " + message);
    }
}
