

def test_config_checks_name_the_field():
    from qsft_jax import config_lib
    from qsft_jax.errors import ConfigError

    config = config_lib.load_config_file(tu.TINY)
    config.phases = ("filtered_bc",)
    with pytest.raises(ConfigError, match=r"config.phases: the filtered_bc phase .* put 'bc' in phases"):
        config_lib.check_config(config, 8)
    config.phases = ("bc", "filtered_bc")
    for bad in (0.0, 1.5):
        config.filtered_bc.top_fraction = bad
        with pytest.raises(ConfigError, match=r"config.filtered_bc.top_fraction: must be in \(0, 1\]"):
            config_lib.check_config(config, 8)
    config.filtered_bc.top_fraction = 0.1
    config_lib.check_config(config, 8)
