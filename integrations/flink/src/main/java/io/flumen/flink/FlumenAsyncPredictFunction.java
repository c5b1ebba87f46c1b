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
    private final Predictor predictor;

    FlumenAsyncPredictFunction(Predictor predictor) {
        this.predictor = predictor;
    }

    @Override
    public void open(FunctionContext context) {
        predictor.open();
    }

    @Override
    public void close() {
        predictor.close();
    }

    @Override
    public CompletableFuture<Collection<RowData>> asyncPredict(RowData input) {
        return predictor.predict(input);
    }
}
