package io.flumen.flink;

import java.util.Collection;
import java.util.concurrent.CompletableFuture;

import org.apache.flink.table.data.RowData;
import org.apache.flink.table.functions.AsyncPredictFunction;
import org.apache.flink.table.functions.FunctionContext;

/**
 * {@code ML_PREDICT}'s async function for a {@code flumen} model: one request per row,
 * retried as the model's options say, exactly one OUTPUT row per input row.
 */
public final class FlumenAsyncPredictFunction extends AsyncPredictFunction {
    private static final long serialVersionUID = 1L;
    private final Settings settings;
    private final Rows rows;
    private transient Client client;

    FlumenAsyncPredictFunction(Settings settings, Rows rows) {
        this.settings = settings;
        this.rows = rows;
    }

    @Override
    public void open(FunctionContext context) {
        client = new Client(settings);
    }

    @Override
    public CompletableFuture<Collection<RowData>> asyncPredict(RowData input) {
        return client.post(rows.body(input)).thenApply(a -> FlumenModelProvider.outcome(settings, rows, a));
    }
}
