package io.flumen.flink;

import java.io.Serializable;
import java.util.Collection;
import java.util.Collections;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;

import org.apache.flink.table.data.RowData;

/**
 * What both of a {@code flumen} model's functions do with a row: one request, retried
 * as the options say, and exactly one OUTPUT row — its prediction, or (by default) a
 * null prediction with its error; with {@code on-error = fail}, an exception instead.
 */
final class Predictor implements Serializable {
    private static final long serialVersionUID = 1L;
    private final Settings settings;
    private final Rows rows;
    private transient Client client;

    Predictor(Settings settings, Rows rows) {
        this.settings = settings;
        this.rows = rows;
    }

    /** Opens the HTTP client, once per function instance. */
    void open() {
        client = new Client(settings);
    }

    /** Closes the HTTP client. */
    void close() {
        if (client != null) {
            client.close();
        }
    }

    /** The OUTPUT row of one input row, to come. */
    CompletableFuture<Collection<RowData>> predict(RowData input) {
        return client.post(rows.body(input)).thenApply(this::outcome);
    }

    private Collection<RowData> outcome(Client.Answer a) {
        String kind = a.kind;
        String message = a.message;
        if (a.ok()) {
            try {
                return Collections.singletonList(rows.answered(a.json));
            } catch (IllegalArgumentException e) {
                kind = "permanent";
                message = e.getMessage();
            }
        }
        if (settings.failOnError) {
            throw new CompletionException(new FlumenException(kind + ": " + message));
        }
        return Collections.singletonList(rows.failed(kind, message));
    }
}
