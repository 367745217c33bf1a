"""The simulated inference worker (`shunter sim`): the default test peer."""
