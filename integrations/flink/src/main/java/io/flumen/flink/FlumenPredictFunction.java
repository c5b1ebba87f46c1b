package io.flumen.flink;

import java.util.Collection;

import org.apache.flink.table.data.RowData;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.PredictFunction;

/** {@code ML_PREDICT}'s sync function for a {@code flumen} model ({@code 'async' = 'false'}). */
public final class FlumenPredictFunction extends PredictFunction {
    private static final long serialVersionUID = 1L;
    private final Predictor predictor;

    FlumenPredictFunction(Predictor predictor) {
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
    public Collection<RowData> predict(RowData input) {
        return predictor.predict(input).join();
    }
}
