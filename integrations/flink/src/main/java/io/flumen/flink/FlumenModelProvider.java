package io.flumen.flink;

import java.util.Collection;
import java.util.Collections;
import java.util.concurrent.CompletionException;

import org.apache.flink.table.data.RowData;
import org.apache.flink.table.functions.AsyncPredictFunction;
import org.apache.flink.table.functions.PredictFunction;
import org.apache.flink.table.ml.AsyncPredictRuntimeProvider;
import org.apache.flink.table.ml.PredictRuntimeProvider;

/** The runtime side of a {@code flumen} model: async (the default) or, with {@code 'async' = 'false'}, sync. */
final class FlumenModelProvider implements AsyncPredictRuntimeProvider, PredictRuntimeProvider {
    private final Settings settings;
    private final Rows rows;

    FlumenModelProvider(Settings settings, Rows rows) {
        this.settings = settings;
        this.rows = rows;
    }

    @Override
    public AsyncPredictFunction createAsyncPredictFunction(Context context) {
        return new FlumenAsyncPredictFunction(settings, rows);
    }

    @Override
    public PredictFunction createPredictFunction(Context context) {
        return new FlumenPredictFunction(settings, rows);
    }

    @Override
    public FlumenModelProvider copy() {
        return new FlumenModelProvider(settings, rows);
    }

    /** One row's outcome: its OUTPUT row, or (with {@code on-error = fail}) an exception. */
    static Collection<RowData> outcome(Settings settings, Rows rows, Client.Answer a) {
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
